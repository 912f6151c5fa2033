//! Csv tables as distributed: plain or gzipped, found by their base name.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

/// Finds `name` (e.g. `mimic-cxr-2.0.0-split.csv`) or its `.gz` twin in `dir`.
pub fn find_table(dir: &Path, name: &str) -> Option<PathBuf> {
    let plain = dir.join(name);
    if plain.is_file() {
        return Some(plain);
    }
    let gz = dir.join(format!("{name}.gz"));
    gz.is_file().then_some(gz)
}

/// Opens a table, decompressing `.gz` transparently.
pub fn open_table(path: &Path) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(f))))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, f)))
    }
}

/// A csv reader that tolerates ragged rows (they are detected and reported by the caller).
pub fn csv_reader(r: Box<dyn Read + Send>) -> csv::Reader<Box<dyn Read + Send>> {
    csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(r)
}

fn write_rows<W: Write>(w: W, header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<W> {
    let mut wr = csv::Writer::from_writer(w);
    wr.write_record(header)?;
    for r in rows {
        wr.write_record(&r)?;
    }
    wr.into_inner().map_err(|e| anyhow::anyhow!("flushing csv: {}", e.error()))
}

/// Writes a gzipped csv table.
pub fn write_csv_gz(path: &Path, header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let gz = GzEncoder::new(BufWriter::new(f), Compression::fast());
    let gz = write_rows(gz, header, rows)?;
    gz.finish()?.flush()?;
    Ok(())
}

/// Writes a plain csv table.
pub fn write_csv(path: &Path, header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    write_rows(BufWriter::new(f), header, rows)?.flush()?;
    Ok(())
}
