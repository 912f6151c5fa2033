//! The sizes of a small CLIP built from scratch: one definition for the training run's flags,
//! `init`'s, `bench train-step`'s, and a plan's `[model]` table.

use anyhow::{ensure, Result};
use clap::Args;
use model::ClipConfig;
use serde::{Deserialize, Serialize};

/// The sizes a run, a command or a plan uses when it is given none.
pub const DEFAULT: ModelSizes = ModelSizes { image: 64, patch: 8, width: 128, layers: 2, heads: 4 };

#[derive(Args, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSizes {
    /// Image side in pixels.
    #[arg(long, default_value_t = DEFAULT.image)]
    pub image: usize,
    /// Patch side in pixels (a divisor of --image).
    #[arg(long, default_value_t = DEFAULT.patch)]
    pub patch: usize,
    /// Width of both towers and of the projection.
    #[arg(long, default_value_t = DEFAULT.width)]
    pub width: usize,
    /// Blocks in each tower.
    #[arg(long, default_value_t = DEFAULT.layers)]
    pub layers: usize,
    /// Attention heads in each tower (a divisor of --width).
    #[arg(long, default_value_t = DEFAULT.heads)]
    pub heads: usize,
}

impl Default for ModelSizes {
    fn default() -> Self {
        DEFAULT
    }
}

impl ModelSizes {
    /// The same sizes in both towers, context 77, the real vocabulary.
    pub fn config(&self) -> ClipConfig {
        ClipConfig::small(self.image, self.patch, self.width, self.layers, self.heads)
    }

    /// The flags' values, checked before any model is built: one line naming the flag.
    pub fn check(&self) -> Result<()> {
        for (flag, v) in [
            ("--image", self.image),
            ("--patch", self.patch),
            ("--width", self.width),
            ("--layers", self.layers),
            ("--heads", self.heads),
        ] {
            ensure!(v > 0, "{flag} must be at least 1");
        }
        ensure!(self.image.is_multiple_of(self.patch), "--patch {} must divide --image {}", self.patch, self.image);
        ensure!(self.width.is_multiple_of(self.heads), "--heads {} must divide --width {}", self.heads, self.width);
        self.config().validate()
    }
}
