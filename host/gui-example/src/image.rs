//! The app's pictures: generated RGBA images, in the shape the `thumbnail` plugin takes
//! (`{width, height, pixels}`, pixels as MessagePack binary).

use serde::{Deserialize, Serialize};

/// An RGBA image, row-major, 4 bytes a pixel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 4` bytes.
    #[serde(with = "serde_bytes")]
    pub pixels: Vec<u8>,
}

/// The id under which the app's photo library holds its one picture (`image.get`).
pub const PHOTO_ID: u64 = 1;

/// A `width` x `height` gradient (red across, green down), opaque.
pub fn gradient(width: u32, height: u32) -> Image {
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 4);
    for y in 0..height {
        for x in 0..width {
            pixels.extend_from_slice(&[
                (x as u64 * 255 / width.max(1) as u64) as u8,
                (y as u64 * 255 / height.max(1) as u64) as u8,
                128,
                255,
            ]);
        }
    }
    Image {
        width,
        height,
        pixels,
    }
}
