//! A zipped plaintext: Stripe's import takes a zip archive encrypted with `gpg`, and
//! other exports come zipped too. The archive's one file is read as a stream from its
//! local header (stored or deflated), so nothing is buffered and no temporary file
//! holds plaintext. An archive with more than one file, an encrypted entry, or a
//! stored entry of unknown size is refused. The zip's own CRC is not checked: the
//! OpenPGP integrity tag around it covers every byte already.

use std::io::{BufRead, Read};

/// A zip local file header's signature.
const LOCAL_HEADER: [u8; 4] = *b"PK\x03\x04";

/// Why a zipped plaintext was refused; carried inside an `io::Error` to the rows'
/// reader, which reports it as the file's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ZipProblem(pub &'static str);

fn problem(what: &'static str) -> std::io::Error {
    std::io::Error::other(ZipProblem(what))
}

/// The zip problem an I/O error carries, if any.
pub fn zip_problem(error: &std::io::Error) -> Option<ZipProblem> {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<ZipProblem>())
        .copied()
}

/// `source`'s plaintext: the one file inside if it is a zip archive, else itself.
pub fn unzip<'r, R: BufRead + 'r>(mut source: R) -> std::io::Result<Box<dyn BufRead + 'r>> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        let n = source.read(&mut head[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if head[..got] != LOCAL_HEADER {
        return Ok(Box::new(
            std::io::Cursor::new(head[..got].to_vec()).chain(source),
        ));
    }
    let mut fixed = [0u8; 26];
    source
        .read_exact(&mut fixed)
        .map_err(|_| problem("the zip archive is cut short"))?;
    let u16_at = |i: usize| u16::from_le_bytes([fixed[i], fixed[i + 1]]);
    let u32_at =
        |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
    let (flags, method) = (u16_at(2), u16_at(4));
    let compressed = u64::from(u32_at(14));
    let skip = u64::from(u16_at(22)) + u64::from(u16_at(24));
    if flags & 1 != 0 {
        return Err(problem(
            "the zip entry is encrypted (OpenPGP encrypts the file)",
        ));
    }
    std::io::copy(&mut (&mut source).take(skip), &mut std::io::sink())?;
    let entry = match method {
        8 => Entry::Deflated(std::io::BufReader::new(
            flate2::bufread::DeflateDecoder::new(source),
        )),
        0 if flags & 8 == 0 => Entry::Stored(source.take(compressed)),
        0 => return Err(problem("a stored zip entry must state its size")),
        _ => return Err(problem("the zip entry is neither stored nor deflated")),
    };
    Ok(Box::new(entry))
}

/// The entry's bytes. A broken deflate stream, or a second file after the first, is
/// the archive's error.
enum Entry<R> {
    Stored(std::io::Take<R>),
    Deflated(std::io::BufReader<flate2::bufread::DeflateDecoder<R>>),
}

impl<R: BufRead> Entry<R> {
    /// What follows the entry in the archive.
    fn after(&mut self) -> &mut R {
        match self {
            Entry::Stored(take) => take.get_mut(),
            Entry::Deflated(reader) => reader.get_mut().get_mut(),
        }
    }
}

impl<R: BufRead> Read for Entry<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Entry<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let empty = match self {
            Entry::Stored(take) => take.fill_buf()?.is_empty(),
            Entry::Deflated(reader) => match reader.fill_buf() {
                Ok(available) => available.is_empty(),
                Err(e)
                    if zip_problem(&e).is_none()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
                        ) =>
                {
                    return Err(problem("the zip entry's deflate stream is broken"));
                }
                Err(e) => return Err(e),
            },
        };
        if empty && self.after().fill_buf()?.starts_with(&LOCAL_HEADER) {
            return Err(problem("the zip archive holds more than one file"));
        }
        match self {
            Entry::Stored(take) => take.fill_buf(),
            Entry::Deflated(reader) => reader.fill_buf(),
        }
    }

    fn consume(&mut self, amount: usize) {
        match self {
            Entry::Stored(take) => take.consume(amount),
            Entry::Deflated(reader) => reader.consume(amount),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// A one-file archive's local header and data (what `unzip` reads).
    fn archive(method: u16, data: &[u8], plain_len: usize) -> Vec<u8> {
        let mut out = LOCAL_HEADER.to_vec();
        out.extend_from_slice(&20u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&method.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(plain_len as u32).to_le_bytes());
        out.extend_from_slice(&9u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(b"cards.csv");
        out.extend_from_slice(data);
        out.extend_from_slice(b"PK\x01\x02 central directory");
        out
    }

    fn read_all(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        unzip(bytes)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn plain_stored_and_deflated_files_read_the_same() {
        let text = b"id,number\n1,2\n";
        assert_eq!(read_all(text).unwrap(), text);
        assert_eq!(read_all(b"id").unwrap(), b"id");
        assert_eq!(read_all(&archive(0, text, text.len())).unwrap(), text);
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        deflate.write_all(text).unwrap();
        let deflated = deflate.finish().unwrap();
        assert_eq!(read_all(&archive(8, &deflated, text.len())).unwrap(), text);
        let broken = archive(8, &[0xff; 16], text.len());
        let error = read_all(&broken).unwrap_err();
        assert!(zip_problem(&error).is_some(), "{error}");
        let mut two = archive(0, text, text.len());
        two.truncate(two.len() - b"PK\x01\x02 central directory".len());
        two.extend_from_slice(&archive(0, text, text.len()));
        let error = read_all(&two).unwrap_err();
        assert_eq!(
            zip_problem(&error),
            Some(ZipProblem("the zip archive holds more than one file"))
        );
        let error = read_all(&archive(12, text, text.len())).unwrap_err();
        assert_eq!(
            zip_problem(&error),
            Some(ZipProblem("the zip entry is neither stored nor deflated"))
        );
    }
}
