//! Property tests ("fuzzing" on stable Rust) of the parsers that read files a user hands in:
//! the report section parser, the csv table reader, the DICOM reader and the shard index /
//! pairs table. Whatever the input, each returns a value or an error, never panics; where a
//! reference exists (a table the csv crate wrote) the value is checked against it.
//!
//! CI runs a modest number of cases (a few seconds); a long run sets `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=200000 cargo test --release -p data --test fuzz`.

use std::fs;
use std::path::Path;

use data::csvio::parse_table;
use data::dicom::{encode_dicom, read_dicom, DicomMeta};
use data::report::{select_text, SectionPolicy};
use data::shards::{parse_pairs_table, ShardIndex, ShardSet};
use proptest::prelude::*;

/// Cases per property: `PROPTEST_CASES` when set, else a number that keeps CI short.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Report-like text: headings, capitals, age phrases, blank lines and arbitrary strings.
fn report_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("FINDINGS:".to_string()),
        Just("IMPRESSION:".to_string()),
        Just("FINAL REPORT".to_string()),
        Just("EXAMINATION: CHEST (PA AND LAT)".to_string()),
        Just("TECHNIQUE".to_string()),
        Just("___-year-old".to_string()),
        Just("45 yo".to_string()),
        Just("\n".to_string()),
        Just("\n\n".to_string()),
        Just(":".to_string()),
        Just(" ".to_string()),
        "[A-Z ]{0,12}",
        "[a-z .,]{0,20}",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn report_sections_never_panic(text in report_text()) {
        for policy in [SectionPolicy::Paper, SectionPolicy::Impression, SectionPolicy::FindingsImpression] {
            let out = select_text(&text, policy);
            // Selected text is made of the report's own words.
            prop_assert!(out.len() <= text.len() + 1, "{policy:?}: {} > {}", out.len(), text.len());
        }
    }

    #[test]
    fn csv_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(t) = parse_table(&bytes) {
            let lines = bytes.split(|&b| b == b'\n').count() as u64;
            for n in t.rows.iter().map(|(n, _)| *n).chain(t.bad.iter().map(|(n, _)| *n)) {
                prop_assert!(n >= 2 && n <= lines, "line {n} of {lines}");
            }
        }
    }

    #[test]
    fn csv_parser_reads_back_what_the_csv_crate_wrote(
        width in 2usize..6,
        cells in prop::collection::vec("[a-z0-9 ,\"']{0,8}", 0..60),
        broken in prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    ) {
        let header: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
        let rows: Vec<Vec<String>> = cells.chunks_exact(width).map(|c| c.to_vec()).collect();
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(&header).unwrap();
        for r in &rows {
            w.write_record(r).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let t = parse_table(&bytes).unwrap();
        prop_assert_eq!(&t.header, &header);
        prop_assert!(t.bad.is_empty());
        let got: Vec<Vec<String>> = t.rows.iter().map(|(_, r)| r.clone()).collect();
        prop_assert_eq!(&got, &rows);
        // An opening quote added at the start of some rows never reaches another row: every
        // other row reads back whole at its line, and each line is one row or one bad line.
        // (A changed row itself may still parse: `",a",,` with a quote before it is the
        // well-formed `",",a",,`; only the reader's width check can catch what csv cannot.)
        if rows.is_empty() {
            return Ok(());
        }
        let mut lines: Vec<String> = String::from_utf8(bytes).unwrap().lines().map(String::from).collect();
        let mut hit: Vec<usize> = broken.iter().map(|i| 1 + i.index(rows.len())).collect();
        hit.sort();
        hit.dedup();
        for &k in &hit {
            lines[k] = format!("\"{}", lines[k]);
        }
        let t = parse_table((lines.join("\n") + "\n").as_bytes()).unwrap();
        prop_assert_eq!(t.rows.len() + t.bad.len(), rows.len());
        let got: std::collections::HashMap<u64, &Vec<String>> = t.rows.iter().map(|(n, r)| (*n, r)).collect();
        for (i, r) in rows.iter().enumerate() {
            if !hit.contains(&(i + 1)) {
                prop_assert_eq!(got.get(&(i as u64 + 2)).copied(), Some(r), "row {}", i);
            }
        }
    }

    #[test]
    fn shard_index_and_pairs_table_never_panic(raw in prop::collection::vec(any::<u8>(), 0..256), text in any::<String>()) {
        let _ = ShardIndex::parse(&raw);
        let _ = parse_pairs_table(&text, Path::new("pairs.jsonl"));
    }

    #[test]
    fn shard_index_from_json_numbers_is_checked(
        bytes in any::<u64>(),
        images in prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..6),
    ) {
        let json = format!(
            "{{\"bytes\":{bytes},\"crc32\":7,\"images\":[{}]}}",
            images.iter().map(|(o, w, h)| format!("[{o},{w},{h}]")).collect::<Vec<_>>().join(",")
        );
        if let Ok(idx) = ShardIndex::parse(json.as_bytes()) {
            for [o, w, h] in idx.images {
                prop_assert!((w as u128) * (h as u128) + (o as u128) <= bytes as u128);
            }
        }
    }
}

/// A small valid DICOM to mutate.
fn seed_dicom() -> Vec<u8> {
    let (w, h) = (12, 10);
    let px: Vec<u8> = (0..w * h).map(|i| (i * 13 % 256) as u8).collect();
    let meta = DicomMeta {
        patient_id: "fuzz".into(),
        sex: "M".into(),
        age: 61,
        view: "AP".into(),
        monochrome1: true,
        uid_seed: 3,
    };
    encode_dicom(&px, w, h, &meta).unwrap()
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn dicom_reader_never_panics_on_mutated_files(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = seed_dicom();
        for (at, v) in &edits {
            let i = at.index(bytes.len());
            bytes[i] = *v;
        }
        if truncate {
            let n = cut.index(bytes.len());
            bytes.truncate(n);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.dcm");
        fs::write(&path, &bytes).unwrap();
        if let Ok(img) = read_dicom(&path) {
            prop_assert_eq!(img.pixels.len(), img.w * img.h);
            prop_assert!(img.w >= 1 && img.h >= 1 && img.w <= 16384 && img.h <= 16384);
        }
    }

    #[test]
    fn dicom_reader_never_panics_on_damaged_lengths(at in any::<prop::sample::Index>(), len in any::<u32>()) {
        let mut bytes = seed_dicom();
        let i = at.index(bytes.len() - 4);
        bytes[i..i + 4].copy_from_slice(&len.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.dcm");
        fs::write(&path, &bytes).unwrap();
        if let Ok(img) = read_dicom(&path) {
            prop_assert_eq!(img.pixels.len(), img.w * img.h);
        }
    }

    #[test]
    fn shard_set_open_never_panics_and_serves_only_in_bounds(
        shard_len in 0usize..64,
        entries in prop::collection::vec((0usize..3, any::<u64>(), 0u32..20, 0u32..20, any::<bool>()), 0..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("shard-00000.bin"), vec![7u8; shard_len]).unwrap();
        fs::write(dir.path().join("shard-00001.bin"), vec![9u8; shard_len / 2]).unwrap();
        let lines: Vec<String> = entries
            .iter()
            .enumerate()
            .map(|(i, (shard, offset, w, h, small))| {
                let offset = if *small { offset % 64 } else { *offset };
                format!(
                    "{{\"subject_id\":\"s\",\"study_id\":\"t\",\"image\":\"i{i}.jpg\",\"split\":\"train\",\"view\":\"PA\",\
                     \"labels\":[],\"text\":\"\",\"boxes\":[],\"shard\":{shard},\"offset\":{offset},\"w\":{w},\"h\":{h}}}"
                )
            })
            .collect();
        fs::write(dir.path().join("pairs.jsonl"), lines.join("\n")).unwrap();
        if let Ok(set) = ShardSet::open(dir.path()) {
            for i in 0..set.pairs.len() {
                let (px, w, h) = set.image(i);
                prop_assert_eq!(px.len(), w * h);
            }
        }
    }
}
