//! JSON <-> MessagePack for the command line.

/// Encodes a JSON value as MessagePack (maps keep their keys as strings).
pub fn to_msgpack(value: &serde_json::Value) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(value).map_err(|e| format!("cannot encode input as MessagePack: {e}"))
}

/// Decodes MessagePack into JSON. Binary becomes an array of byte values; map keys that are
/// not strings are written as their JSON text.
pub fn from_msgpack(bytes: &[u8]) -> Result<serde_json::Value, String> {
    let mut reader = bytes;
    let value = rmpv::decode::read_value(&mut reader)
        .map_err(|e| format!("plugin output is not valid MessagePack: {e}"))?;
    if !reader.is_empty() {
        return Err(format!(
            "plugin output has {} bytes after its MessagePack value",
            reader.len()
        ));
    }
    Ok(convert(value))
}

fn convert(value: rmpv::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        rmpv::Value::Nil => J::Null,
        rmpv::Value::Boolean(b) => J::Bool(b),
        rmpv::Value::Integer(i) => {
            if let Some(n) = i.as_u64() {
                J::from(n)
            } else {
                J::from(i.as_i64().unwrap_or_default())
            }
        }
        rmpv::Value::F32(f) => serde_json::Number::from_f64(f as f64).map_or(J::Null, J::Number),
        rmpv::Value::F64(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        rmpv::Value::String(s) => J::String(s.into_str().unwrap_or_default()),
        rmpv::Value::Binary(b) => J::Array(b.into_iter().map(J::from).collect()),
        rmpv::Value::Array(items) => J::Array(items.into_iter().map(convert).collect()),
        rmpv::Value::Map(entries) => J::Object(
            entries
                .into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        rmpv::Value::String(s) => s.into_str().unwrap_or_default(),
                        other => convert(other).to_string(),
                    };
                    (key, convert(v))
                })
                .collect(),
        ),
        rmpv::Value::Ext(tag, data) => serde_json::json!({ "ext": tag, "data": data }),
    }
}
