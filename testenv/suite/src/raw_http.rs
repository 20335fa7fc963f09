//! HTTP/1.1 spoken by hand over real sockets, for tests that need what no well-behaved client
//! does: pipelining without reading, a chosen source address (any of 127.0.0.0/8 reaches a
//! server on 127.0.0.1, and each counts as another client), browser headers, half-sent requests.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers, names in lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A request: `METHOD PATH`, `Host: 127.0.0.1` unless `headers` name another, the headers, a
/// body with its length.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        out.push_str("Host: 127.0.0.1\r\n");
    }
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// A keep-alive connection.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to `addr`.
    pub async fn connect(addr: &str) -> io::Result<Self> {
        Ok(Self::from(TcpStream::connect(addr).await?))
    }

    /// Connects to `addr` from `source` (an address of this host, e.g. `127.0.0.7`), with a
    /// receive buffer of `rcvbuf` bytes when given (a client that reads nothing fills it soon).
    pub async fn connect_from(addr: &str, source: &str, rcvbuf: Option<u32>) -> io::Result<Self> {
        let to: SocketAddr = addr.parse().map_err(io::Error::other)?;
        let from: SocketAddr = format!("{source}:0").parse().map_err(io::Error::other)?;
        let sock = TcpSocket::new_v4()?;
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n)?;
        }
        sock.bind(from)?;
        Ok(Self::from(sock.connect(to).await?))
    }

    /// Writes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next answer; `Ok(None)` when the server closed the connection before one.
    pub async fn answer(&mut self) -> io::Result<Option<Answer>> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let start = end + 4;
                while self.buf.len() < start + len {
                    if !self.fill().await? {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                let body = self.buf[start..start + len].to_vec();
                self.buf.drain(..start + len);
                return Ok(Some(Answer {
                    status,
                    headers,
                    body,
                }));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Sends a request and reads its answer.
    pub async fn call(&mut self, bytes: &[u8]) -> io::Result<Option<Answer>> {
        self.send(bytes).await?;
        self.answer().await
    }

    /// True when the server closes the connection (or resets it) within `limit`, reading and
    /// discarding whatever comes before.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut scratch = vec![0u8; 64 * 1024];
        tokio::time::timeout(limit, async {
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    async fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = match self.stream.read(&mut chunk).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }
}

impl From<TcpStream> for Conn {
    fn from(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            buf: Vec::new(),
        }
    }
}

/// One request on a connection of its own; `None` when the server closed it without answering
/// (a connection cap) or it could not connect.
pub async fn once(addr: &str, bytes: &[u8]) -> Option<Answer> {
    let mut c = Conn::connect(addr).await.ok()?;
    c.call(bytes).await.ok().flatten()
}
