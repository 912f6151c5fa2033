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

/// Reads a whole table into memory, decompressing `.gz`. A gzip stream that ends early (a
/// truncated download) or is corrupt is an error naming the file: reading as far as it goes
/// would train on part of the index without a word.
pub fn read_table_bytes(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_table(path)?.read_to_end(&mut bytes).with_context(|| {
        if path.extension().is_some_and(|e| e == "gz") {
            format!("{}: truncated or corrupt gzip (after {} bytes of csv)", path.display(), bytes.len())
        } else {
            format!("reading {}", path.display())
        }
    })?;
    Ok(bytes)
}

/// A csv table as parsed by [`parse_table`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedTable {
    /// The header's cells, trimmed.
    pub header: Vec<String>,
    /// (1-based line number, cells) of every row that parsed, in file order.
    pub rows: Vec<(u64, Vec<String>)>,
    /// (1-based line number, what is wrong) of every row left out.
    pub bad: Vec<(u64, String)>,
}

/// Parses a csv table one line at a time (RFC 4180 quoting within a line: `"a,b"`, `"say ""x"""`;
/// a quote inside an unquoted cell is a literal character, as the csv crate reads it). The
/// tables read here never hold a line break inside a cell, so a line is a row: a quote that is
/// not closed on its line, or text after a closing quote, costs that row alone (listed in
/// `bad` with its line) instead of swallowing the rest of the file into one cell. Blank lines
/// are skipped. Rows are not checked against the header's width (the caller reports ragged
/// rows). An error only when there is no header line or the header itself is malformed.
pub fn parse_table(bytes: &[u8]) -> std::result::Result<ParsedTable, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut table = ParsedTable::default();
    let mut have_header = false;
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let n = i as u64 + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match split_line(line) {
            Ok(cells) if !have_header => {
                table.header = cells.into_iter().map(|c| c.trim().to_string()).collect();
                have_header = true;
            }
            Ok(cells) => table.rows.push((n, cells)),
            Err(e) if !have_header => return Err(format!("line {n} (the header): {e}")),
            Err(e) => table.bad.push((n, e)),
        }
    }
    if !have_header {
        return Err("no header line (an empty table)".into());
    }
    Ok(table)
}

/// The cells of one csv line (without its line break).
fn split_line(line: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut cells = Vec::new();
    let mut cell: Vec<u8> = Vec::new();
    let mut i = 0;
    loop {
        if line.get(i) == Some(&b'"') {
            // A quoted cell: up to the quote that is not doubled.
            let start = i;
            i += 1;
            loop {
                match line.get(i) {
                    None => return Err(format!("unbalanced quote (opened at column {})", start + 1)),
                    Some(b'"') if line.get(i + 1) == Some(&b'"') => {
                        cell.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&b) => {
                        cell.push(b);
                        i += 1;
                    }
                }
            }
            match line.get(i) {
                None | Some(b',') => {}
                Some(_) => return Err(format!("text after a closing quote at column {}", i + 1)),
            }
        } else {
            while let Some(&b) = line.get(i) {
                if b == b',' {
                    break;
                }
                cell.push(b);
                i += 1;
            }
        }
        cells.push(String::from_utf8_lossy(&cell).into_owned());
        cell.clear();
        if i >= line.len() {
            return Ok(cells);
        }
        // At a comma: the next cell (possibly empty, at the line's end).
        i += 1;
    }
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
    let gz = write_rows(gz, header, rows).with_context(|| format!("writing {}", path.display()))?;
    gz.finish().and_then(|mut w| w.flush()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes a plain csv table.
pub fn write_csv(path: &Path, header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    write_rows(BufWriter::new(f), header, rows)
        .with_context(|| format!("writing {}", path.display()))?
        .flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
