//! The CLI's side of the admin socket: send one request, read one response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{Request, Response};

/// How long the gateway may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the gateway's admin socket {path}: {source}{hint}")]
    Connect {
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("admin socket sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the gateway closed the admin connection without an answer")]
    NoAnswer,
}

/// Sends `request` to the gateway at `socket` and returns its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (run as root or as a member of the group wardgate)"
            }
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is the gateway running? see --config or --socket)"
            }
            _ => "",
        };
        ClientError::Connect {
            path: socket.display().to_string(),
            source,
            hint,
        }
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // A refused caller may find the socket closed before it has written: its answer (the
    // refusal) is still there to read.
    let written = stream.write_all(&line);
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        written?;
        return Err(ClientError::NoAnswer);
    }
    Ok(serde_json::from_str(&answer)?)
}
