//! `thumbnail`: resizes RGBA images with an area-averaging filter (good for thumbnails:
//! every source pixel contributes to the result in proportion to the area it covers).
//!
//! Methods:
//! - `resize` `{image, width, height}` -> image of exactly that size;
//! - `thumbnail` `{image, max_size}` -> image that fits in `max_size` x `max_size`,
//!   keeping the aspect ratio;
//! - `grayscale` `image` -> image;
//! - `info` `image` -> `{width, height, mean: [r, g, b, a]}`;
//! - `thumbnail_by_id` `{id, max_size}` -> what `thumbnail` returns, for an image the
//!   plugin asks the app for by id (see below).
//!
//! An image is `{width, height, pixels}` with `pixels` as MessagePack binary of
//! `width * height * 4` bytes (RGBA, row-major).
//!
//! `thumbnail_by_id` shows a host function in use. The app holds the images (a document's
//! pictures, a photo library) and the caller only names one: instead of the caller
//! sending several MiB of pixels with the call, the plugin calls the app's `image.get`
//! host function (`ctx.host_call`; input: the id as a `u64`, output: an image as above,
//! pixels as MessagePack binary) and makes the thumbnail from what it gets back. The
//! manifest lists `image.get` in `imports`, and the app must register it
//! (`HostBuilder::function("image.get", ..)`); `plugin-host demo` does. The app's error
//! (an unknown id, say) reaches the caller as this method's error, in the app's words.

use plugin_api::{export_plugin, Context, CreateContext, Methods, Plugin, PluginError};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    max_dimension: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_dimension: 16384,
        }
    }
}

/// An RGBA image.
#[derive(Serialize, Deserialize)]
struct Image {
    width: u32,
    height: u32,
    #[serde(with = "plugin_api::serde_bytes")]
    pixels: Vec<u8>,
}

#[derive(Deserialize)]
struct Resize {
    image: Image,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct Thumb {
    image: Image,
    max_size: u32,
}

#[derive(Deserialize)]
struct ThumbById {
    id: u64,
    max_size: u32,
}

#[derive(Serialize)]
struct Info {
    width: u32,
    height: u32,
    mean: [u8; 4],
}

struct Thumbnail {
    max_dimension: u32,
}

impl Thumbnail {
    fn check(&self, image: &Image) -> Result<(), PluginError> {
        self.check_size(image.width, image.height)?;
        let expected = image.width as usize * image.height as usize * 4;
        if image.pixels.len() != expected {
            return Err(PluginError::new(format!(
                "image is {}x{} so pixels must be {expected} bytes (RGBA), got {}",
                image.width,
                image.height,
                image.pixels.len()
            )));
        }
        Ok(())
    }

    /// The image scaled down to fit in `max_size` x `max_size`, keeping its aspect ratio
    /// (an image that fits already is returned at its size).
    fn thumbnail(
        &self,
        ctx: &Context<'_>,
        image: &Image,
        max_size: u32,
    ) -> Result<Image, PluginError> {
        self.check(image)?;
        if max_size == 0 {
            return Err(PluginError::new("max_size must be at least 1"));
        }
        let (w, h) = (image.width as u64, image.height as u64);
        let m = max_size as u64;
        let (tw, th) = if w <= m && h <= m {
            (w, h)
        } else if w >= h {
            (m, (h * m / w).max(1))
        } else {
            ((w * m / h).max(1), m)
        };
        resize(ctx, image, tw as u32, th as u32)
    }

    fn check_size(&self, width: u32, height: u32) -> Result<(), PluginError> {
        if width == 0 || height == 0 || width > self.max_dimension || height > self.max_dimension {
            return Err(PluginError::new(format!(
                "size {width}x{height} is out of range: each side must be 1..={}",
                self.max_dimension
            )));
        }
        Ok(())
    }
}

/// For each destination index along one axis: the source range it covers, with the
/// weights of the first and last source pixels (the inner ones weigh 1).
fn spans(src: u32, dst: u32) -> Vec<(usize, usize, f32, f32, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let start = d as f64 * scale;
            let end = ((d + 1) as f64 * scale).min(src as f64);
            let first = start.floor() as usize;
            let last = ((end.ceil() as usize).max(first + 1) - 1).min(src as usize - 1);
            let w_first = if first == last {
                (end - start) as f32
            } else {
                (first as f64 + 1.0 - start) as f32
            };
            let w_last = if first == last {
                w_first
            } else {
                (end - last as f64) as f32
            };
            (first, last, w_first, w_last, (end - start) as f32)
        })
        .collect()
}

fn resize(ctx: &Context<'_>, image: &Image, width: u32, height: u32) -> Result<Image, PluginError> {
    let (sw, sh) = (image.width as usize, image.height as usize);
    let (dw, dh) = (width as usize, height as usize);
    // Horizontal pass: sh rows of dw pixels, as f32.
    let xs = spans(image.width, width);
    let mut tmp = vec![0f32; sh * dw * 4];
    for y in 0..sh {
        let row = &image.pixels[y * sw * 4..(y + 1) * sw * 4];
        for (x, &(first, last, wf, wl, total)) in xs.iter().enumerate() {
            let mut acc = [0f32; 4];
            for sx in first..=last {
                let w = if sx == first {
                    wf
                } else if sx == last {
                    wl
                } else {
                    1.0
                };
                for c in 0..4 {
                    acc[c] += row[sx * 4 + c] as f32 * w;
                }
            }
            for c in 0..4 {
                tmp[(y * dw + x) * 4 + c] = acc[c] / total;
            }
        }
        if y % 256 == 255 {
            if ctx.is_cancelled() {
                return Err(PluginError::new("cancelled"));
            }
            ctx.progress(0.5 * (y + 1) as f64 / sh as f64, "horizontal pass");
        }
    }
    // Vertical pass.
    let ys = spans(image.height, height);
    let mut pixels = vec![0u8; dw * dh * 4];
    for (y, &(first, last, wf, wl, total)) in ys.iter().enumerate() {
        for x in 0..dw {
            let mut acc = [0f32; 4];
            for sy in first..=last {
                let w = if sy == first {
                    wf
                } else if sy == last {
                    wl
                } else {
                    1.0
                };
                for c in 0..4 {
                    acc[c] += tmp[(sy * dw + x) * 4 + c] * w;
                }
            }
            for c in 0..4 {
                pixels[(y * dw + x) * 4 + c] = (acc[c] / total).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    ctx.progress(1.0, "done");
    Ok(Image {
        width,
        height,
        pixels,
    })
}

impl Plugin for Thumbnail {
    fn create(ctx: &CreateContext<'_>) -> Result<Self, PluginError> {
        let config: Config = ctx.config()?;
        if config.max_dimension == 0 {
            return Err(PluginError::new("config.max_dimension must be at least 1"));
        }
        Ok(Thumbnail {
            max_dimension: config.max_dimension,
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .add(
                "resize",
                |this: &Thumbnail, ctx: &Context<'_>, req: Resize| {
                    this.check(&req.image)?;
                    this.check_size(req.width, req.height)?;
                    resize(ctx, &req.image, req.width, req.height)
                },
            )
            .add(
                "thumbnail",
                |this: &Thumbnail, ctx: &Context<'_>, req: Thumb| {
                    this.thumbnail(ctx, &req.image, req.max_size)
                },
            )
            .add(
                "grayscale",
                |this: &Thumbnail, _: &Context<'_>, mut image: Image| {
                    this.check(&image)?;
                    for px in image.pixels.chunks_exact_mut(4) {
                        let l =
                            (0.2126 * px[0] as f32 + 0.7152 * px[1] as f32 + 0.0722 * px[2] as f32)
                                .round() as u8;
                        px[0] = l;
                        px[1] = l;
                        px[2] = l;
                    }
                    Ok(image)
                },
            )
            .add("info", |this: &Thumbnail, _: &Context<'_>, image: Image| {
                this.check(&image)?;
                let mut sum = [0u64; 4];
                for px in image.pixels.chunks_exact(4) {
                    for c in 0..4 {
                        sum[c] += px[c] as u64;
                    }
                }
                let n = (image.pixels.len() / 4) as u64;
                let mean = sum.map(|s| ((s + n / 2) / n) as u8);
                Ok(Info {
                    width: image.width,
                    height: image.height,
                    mean,
                })
            })
            .add(
                "thumbnail_by_id",
                |this: &Thumbnail, ctx: &Context<'_>, req: ThumbById| {
                    // The app's image, or its error (no such image, or no `image.get` at
                    // all) as this call's error, in the app's words.
                    let image: Image = ctx.host_call("image.get", &req.id)?;
                    this.thumbnail(ctx, &image, req.max_size)
                },
            );
    }
}

export_plugin!(Thumbnail);
