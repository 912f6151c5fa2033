//! The coordinator's gRPC contract: `proto/cxrclip.proto`, compiled at build time by protox
//! (no `protoc` binary needed), with the prost messages and the tonic client and server.

pub mod v1 {
    tonic::include_proto!("cxrclip.v1");
}

/// The revision of the `cxrclip.v1` protocol this build speaks; a worker of another revision
/// is refused at registration with a message naming both. Revision 2 added `Job.options` (the
/// training mode, schedule, AdamW, augmentation and label policy), which an older worker would
/// ignore and train something else, and the job kinds (fine-tuning, feature extraction),
/// labelled shard entries and validation results. Revision 3 ties every call after
/// registration to its registration by a secret (`Session.secret`), which an older worker would
/// not send (each of its calls refused), and names a failed peer (`JobResult.lost_peer`).
pub const PROTOCOL_VERSION: u32 = 3;

/// The largest message either side accepts or sends (a shard chunk, the job, an NCCL id):
/// larger ones are refused, so a hostile peer cannot make the other allocate without bound.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Pair entries per shard chunk: an epoch's shard is streamed in chunks of this many.
pub const SHARD_CHUNK: usize = 1024;

pub use prost;
pub use tonic;

/// `s` fit to print on a terminal or a log line: control characters (escape sequences,
/// carriage returns, new lines, NUL) are written as Rust escapes (`\u{1b}`, `\r`, `\n`) and the
/// rest is kept. Every string received from the network (a worker's host name, a failure
/// message, a path in a report, a status message) goes through this before it is printed, so a
/// peer cannot move the cursor, recolour or rewrite the operator's terminal or forge log lines.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(printable("rank 1: ring closed (pid 42) é"), "rank 1: ring closed (pid 42) é");
        assert_eq!(printable("\u{1b}[31mred\u{1b}[0m"), "\\u{1b}[31mred\\u{1b}[0m");
        assert_eq!(printable("a\rb\nc\0d\u{9b}e\tf"), "a\\rb\\nc\\u{0}d\\u{9b}e\\tf");
        // Nothing printed from it holds a control character, whatever went in.
        let all: String = (0u32..0x250).filter_map(char::from_u32).collect();
        assert!(!printable(&all).chars().any(char::is_control));
    }
}
