//! JSON typed by the user in, MessagePack to the plugin; MessagePack back, JSON shown.
//!
//! Plugins take MessagePack maps keyed by field name, which JSON objects map onto. One
//! extension for pictures, which nobody types: `{"$image": [W, H]}` anywhere in the input
//! stands for a generated W x H RGBA image `{width, height, pixels}` (pixels as
//! MessagePack binary), what `thumbnail`'s methods take. In the output, binary is shown as
//! `"<N bytes>"` rather than as N numbers.

use rmpv::Value as Mp;
use serde_json::Value as Json;

/// The largest image `$image` makes, in pixels (64 MiB of RGBA is over a frame anyway).
const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;

/// How much of a pretty-printed output is shown.
const MAX_SHOWN: usize = 4000;

/// Parses `text` as JSON (empty: `null`) and encodes it as MessagePack.
pub fn input(text: &str) -> Result<Vec<u8>, String> {
    let json: Json = match text.trim() {
        "" => Json::Null,
        text => serde_json::from_str(text).map_err(|e| format!("the input is not JSON: {e}"))?,
    };
    let value = to_msgpack(&json)?;
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &value).map_err(|e| e.to_string())?;
    Ok(bytes)
}

fn to_msgpack(json: &Json) -> Result<Mp, String> {
    Ok(match json {
        Json::Null => Mp::Nil,
        Json::Bool(b) => Mp::Boolean(*b),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Mp::from(u),
            (None, Some(i), _) => Mp::from(i),
            (None, None, Some(f)) => Mp::F64(f),
            _ => return Err(format!("unsupported number {n}")),
        },
        Json::String(s) => Mp::from(s.as_str()),
        Json::Array(items) => Mp::Array(items.iter().map(to_msgpack).collect::<Result<_, _>>()?),
        Json::Object(map) => {
            if let (1, Some(size)) = (map.len(), map.get("$image")) {
                return image(size);
            }
            Mp::Map(
                map.iter()
                    .map(|(k, v)| Ok((Mp::from(k.as_str()), to_msgpack(v)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
    })
}

/// `{"$image": [W, H]}`: a generated image as the plugin's `{width, height, pixels}`.
fn image(size: &Json) -> Result<Mp, String> {
    let dims: Option<(u64, u64)> = match size.as_array().map(Vec::as_slice) {
        Some([w, h]) => w.as_u64().zip(h.as_u64()),
        _ => None,
    };
    let (w, h) = dims
        .filter(|&(w, h)| w > 0 && h > 0 && w * h <= MAX_IMAGE_PIXELS)
        .ok_or_else(|| {
            format!("`$image` takes [width, height], at most {MAX_IMAGE_PIXELS} pixels in all")
        })?;
    let image = crate::image::gradient(w as u32, h as u32);
    Ok(Mp::Map(vec![
        (Mp::from("width"), Mp::from(image.width)),
        (Mp::from("height"), Mp::from(image.height)),
        (Mp::from("pixels"), Mp::Binary(image.pixels)),
    ]))
}

/// Decodes a plugin's MessagePack output as JSON (binary as `"<N bytes>"`).
pub fn output(bytes: &[u8]) -> Result<Json, String> {
    let mut reader = bytes;
    let value = rmpv::decode::read_value(&mut reader)
        .map_err(|e| format!("the output is not MessagePack ({} bytes): {e}", bytes.len()))?;
    Ok(to_json(value))
}

/// [`output`], pretty-printed and cut to a length a panel can show; or what was wrong.
pub fn output_text(bytes: &[u8]) -> String {
    match output(bytes) {
        Ok(json) => {
            let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
            if text.len() > MAX_SHOWN {
                let cut = (0..=MAX_SHOWN)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text.truncate(cut);
                text.push_str("\n...");
            }
            text
        }
        Err(e) => e,
    }
}

fn to_json(value: Mp) -> Json {
    match value {
        Mp::Nil => Json::Null,
        Mp::Boolean(b) => Json::Bool(b),
        Mp::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Json::from(u),
            (None, Some(i)) => Json::from(i),
            _ => Json::Null,
        },
        Mp::F32(f) => serde_json::Number::from_f64(f64::from(f)).map_or(Json::Null, Json::Number),
        Mp::F64(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Mp::String(s) => Json::String(s.into_str().unwrap_or_default()),
        Mp::Binary(b) => Json::String(format!("<{} bytes>", b.len())),
        Mp::Array(items) => Json::Array(items.into_iter().map(to_json).collect()),
        Mp::Map(entries) => Json::Object(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Mp::String(s) => s.into_str().unwrap_or_default(),
                        other => to_json(other).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Mp::Ext(tag, data) => Json::String(format!("<ext {tag}: {} bytes>", data.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_round_trips_and_binary_is_summarised() {
        let bytes = input(r#"{"name": "world", "n": -3, "x": 1.5, "list": [true, null]}"#)
            .expect("valid JSON");
        let json = output(&bytes).expect("MessagePack");
        assert_eq!(
            json,
            serde_json::json!({"name": "world", "n": -3, "x": 1.5, "list": [true, null]})
        );
        let image = input(r#"{"image": {"$image": [4, 2]}, "width": 1}"#).expect("image");
        let json = output(&image).expect("MessagePack");
        assert_eq!(
            json,
            serde_json::json!({"image": {"width": 4, "height": 2, "pixels": "<32 bytes>"}, "width": 1})
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(input("{not json").unwrap_err().contains("not JSON"));
        assert!(input(r#"{"$image": [0, 5]}"#)
            .unwrap_err()
            .contains("$image"));
        assert!(input(r#"{"$image": "big"}"#)
            .unwrap_err()
            .contains("$image"));
        assert_eq!(output(&[]).unwrap_err().split(' ').next(), Some("the"));
        assert_eq!(input("").expect("empty is null"), vec![0xc0]);
    }
}
