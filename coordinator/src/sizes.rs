//! The model-size flags shared by the commands that build a small CLIP from scratch.

use clap::Args;
use model::ClipConfig;

#[derive(Args, Clone, Debug)]
pub struct SizeArgs {
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub image: usize,
    #[arg(long, default_value_t = 8)]
    pub patch: usize,
    /// Width of both towers (and the projection).
    #[arg(long, default_value_t = 256)]
    pub width: usize,
    /// Blocks in each tower.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Attention heads in each tower.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
}

impl SizeArgs {
    /// The same sizes in both towers, context 77, the real vocabulary.
    pub fn config(&self) -> ClipConfig {
        ClipConfig::small(self.image, self.patch, self.width, self.layers, self.heads)
    }
}
