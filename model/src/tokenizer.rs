//! CLIP's byte-level BPE tokenizer (49,408 tokens), with open_clip's framing: 77 ids per text,
//! `<|startoftext|>`, the tokens, `<|endoftext|>`, then zero padding; a text that is too long is cut
//! so that `<|endoftext|>` stays the last id.
//!
//! The tokenizer is a `tokenizers` JSON file built by `scripts/make_tokenizer.py` from the CLIP
//! merge list that open_clip ships (MIT); it is embedded gzip-compressed
//! (`model/assets/tokenizer.json.gz`, 0.55 MB) and travels with checkpoints as `tokenizer.json`
//! ([`ClipTokenizer::save_json`]). Its pipeline:
//!
//! - normaliser: NFC; the parts of open_clip's `ftfy.fix_text` + double `html.unescape` cleaning
//!   that fixed replacements can do (terminal colour escapes and control characters removed, curly
//!   quotes straightened, Latin ligatures split, `&amp;` `&lt;` `&gt;` `&quot;` `&apos;` `&#39;`
//!   `&#x27;` `&#34;` `&nbsp;` unescaped); whitespace runs collapsed to one space; trimmed;
//!   lower-cased;
//! - pre-tokeniser: CLIP's pattern (`'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
//!   whitespace dropped), then byte-level (CLIP's byte-to-unicode table, no prefix space);
//! - model: BPE with end-of-word suffix `</w>`;
//! - post-processor: a template adding `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
//!
//! Parity: `model/tests/tokenizer.rs` checks the ids of `open_clip.tokenize` (open_clip 3.3.0,
//! ftfy 6.3.1) on 47 texts (reports, case, punctuation, numbers, `___`, whitespace, unicode,
//! apostrophes, HTML entities, truncation, the empty string); 43 are identical. The remaining
//! differences are deliberate or out of reach of a fixed normaliser, and are pinned by the test:
//!
//! - mojibake (`cafÃ©`): ftfy repairs text decoded in the wrong encoding; we tokenise it as is;
//! - fullwidth / halfwidth forms (`ＣＴ`): ftfy maps them to ASCII; we do not (about 230 extra
//!   replacements would double the normalisation time, for characters English reports lack);
//! - a word-final capital sigma: Python's `str.lower` gives `ς`, the `Lowercase` normaliser `σ`;
//! - open_clip 3.x turns its special-token spelling written in the text (`<start_of_text>`) into the
//!   special token; here every text is plain text (also `<|endoftext|>`), so a report cannot inject
//!   a control token;
//! - HTML: ftfy unescapes every entity (unless the text contains `<`), and `html.unescape` runs twice;
//!   we unescape only the entities listed above (`&amp;` twice first).
//!
//! Whitespace is what Unicode calls white space (Python's `str.split` also splits on U+001C..U+001F,
//! which both sides remove as control characters anyway).

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use tokenizers::Tokenizer;

/// Ids per text (CLIP's text context).
pub const CONTEXT_LEN: usize = 77;
/// `<|startoftext|>`.
pub const SOT: i32 = 49406;
/// `<|endoftext|>`; the text tower pools at its position.
pub const EOT: i32 = 49407;
/// Vocabulary size of CLIP's tokenizer (and of the token embedding).
pub const VOCAB: usize = 49408;

const SOT_TOKEN: &str = "<|startoftext|>";
const EOT_TOKEN: &str = "<|endoftext|>";

static TOKENIZER_JSON_GZ: &[u8] = include_bytes!("../assets/tokenizer.json.gz");

/// CLIP tokenizer producing fixed-length rows of [`CONTEXT_LEN`] ids.
///
/// Loading parses a 1.7 MB JSON file (tens of milliseconds): build one and share it
/// (it is `Send + Sync`; encoding takes `&self`).
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    sot: i32,
    eot: i32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab_size())
            .field("sot", &self.sot)
            .field("eot", &self.eot)
            .finish()
    }
}

impl ClipTokenizer {
    /// The embedded CLIP tokenizer.
    pub fn new() -> anyhow::Result<Self> {
        let mut json = Vec::with_capacity(2 << 20);
        flate2::read::GzDecoder::new(TOKENIZER_JSON_GZ)
            .read_to_end(&mut json)
            .context("decompressing the embedded tokenizer.json.gz")?;
        Self::from_json_bytes(&json)
    }

    /// A tokenizer from a user-supplied `tokenizer.json` (for example the one of a Hugging Face
    /// CLIP checkpoint). It must know `<|startoftext|>` and `<|endoftext|>`; its own truncation and
    /// padding settings are ignored (framing is done here, as open_clip does).
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_bytes(&bytes).with_context(|| format!("loading tokenizer {}", path.display()))
    }

    /// A tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_json_bytes(json: &[u8]) -> anyhow::Result<Self> {
        let mut inner = Tokenizer::from_bytes(json).map_err(|e| anyhow!("parsing tokenizer.json: {e}"))?;
        inner.with_truncation(None).map_err(|e| anyhow!("disabling truncation: {e}"))?;
        inner.with_padding(None);
        let id = |tok: &str| -> anyhow::Result<i32> {
            let id = inner.token_to_id(tok).ok_or_else(|| anyhow!("tokenizer has no {tok} token"))?;
            i32::try_from(id).context("token id does not fit in i32")
        };
        let (sot, eot) = (id(SOT_TOKEN)?, id(EOT_TOKEN)?);
        let out = Self { inner, sot, eot };
        // Fail here, not in the infallible `encode`, if the pipeline cannot run.
        out.try_encode_into("a probe, 1.", &mut [0; CONTEXT_LEN])?;
        Ok(out)
    }

    /// Exactly [`CONTEXT_LEN`] ids: start, tokens, end, zeros (open_clip's `tokenize`).
    ///
    /// Panics only if the tokenizer pipeline itself fails, which loading has ruled out for the
    /// tokenizers accepted here.
    pub fn encode(&self, text: &str) -> Vec<i32> {
        let mut out = vec![0; CONTEXT_LEN];
        self.try_encode_into(text, &mut out).expect("CLIP tokenizer failed");
        out
    }

    /// `texts.len() * CONTEXT_LEN` ids, row-major, encoded in parallel (rayon, through `tokenizers`;
    /// `TOKENIZERS_PARALLELISM=false` makes it sequential).
    pub fn encode_batch(&self, texts: &[&str]) -> Vec<i32> {
        let encodings = self.inner.encode_batch_fast(texts.to_vec(), false).expect("CLIP tokenizer failed");
        let mut out = vec![0; texts.len() * CONTEXT_LEN];
        for (row, enc) in out.chunks_exact_mut(CONTEXT_LEN).zip(&encodings) {
            self.frame(enc.get_ids(), row);
        }
        out
    }

    /// Like [`encode`](Self::encode), writing into `out` (length [`CONTEXT_LEN`]) and returning errors.
    pub fn try_encode_into(&self, text: &str, out: &mut [i32]) -> anyhow::Result<()> {
        if out.len() != CONTEXT_LEN {
            bail!("output row has {} ids, expected {CONTEXT_LEN}", out.len());
        }
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        self.frame(enc.get_ids(), out);
        Ok(())
    }

    fn frame(&self, ids: &[u32], out: &mut [i32]) {
        let n = ids.len().min(CONTEXT_LEN - 2);
        out[0] = self.sot;
        for (o, &id) in out[1..=n].iter_mut().zip(ids) {
            *o = id as i32;
        }
        out[n + 1] = self.eot;
        out[n + 2..].fill(0);
    }

    /// The text of one row of ids (what lies between the start token and the first end token),
    /// lower-cased and normalised as encoding left it, words separated by spaces.
    pub fn decode(&self, ids: &[i32]) -> anyhow::Result<String> {
        let body = ids.strip_prefix(&[self.sot]).unwrap_or(ids);
        let end = body.iter().position(|&id| id == self.eot).unwrap_or(body.len());
        let ids = body[..end]
            .iter()
            .map(|&id| u32::try_from(id).map_err(|_| anyhow!("negative token id {id}")))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        let text = self.inner.decode(&ids, false).map_err(|e| anyhow!("decoding: {e}"))?;
        Ok(text.trim_end().to_string())
    }

    /// Writes the tokenizer as `tokenizer.json` (the `tokenizers` format), for checkpoints.
    pub fn save_json(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let json = self.inner.to_string(false).map_err(|e| anyhow!("serialising tokenizer: {e}"))?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
    }

    /// Number of tokens, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a vocabulary entry.
    pub fn token_to_id(&self, token: &str) -> Option<i32> {
        self.inner.token_to_id(token).and_then(|id| i32::try_from(id).ok())
    }

    /// The start-of-text id (49406 for CLIP).
    pub fn sot(&self) -> i32 {
        self.sot
    }

    /// The end-of-text id (49407 for CLIP).
    pub fn eot(&self) -> i32 {
        self.eot
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_pads() {
        let tok = ClipTokenizer::new().unwrap();
        let ids = tok.encode("No acute cardiopulmonary process.");
        assert_eq!(ids.len(), CONTEXT_LEN);
        assert_eq!(ids[0], SOT);
        let end = ids.iter().position(|&i| i == EOT).unwrap();
        assert!(end > 1);
        assert!(ids[end + 1..].iter().all(|&i| i == 0));
        assert_eq!(tok.encode(""), [&[SOT, EOT][..], &[0; CONTEXT_LEN - 2]].concat());
    }
}
