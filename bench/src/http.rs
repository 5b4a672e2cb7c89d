//! A minimal HTTP/1.1 keep-alive client: one request at a time per connection, responses with
//! `Content-Length` (what the sidecar's hyper server sends). Kept small so that the load
//! generator's own CPU, which shares the machine's cores with the sidecar, stays low and equal
//! for every target.

use std::io::Write;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    req: Vec<u8>,
    buf: Vec<u8>,
}

/// Status and `X-Wtc-Cache` of one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub cache: Option<String>,
    pub body_len: usize,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let mut c = Self {
            addr,
            stream: None,
            req: Vec::with_capacity(512),
            buf: Vec::with_capacity(4096),
        };
        c.stream = Some(c.open().await?);
        Ok(c)
    }

    async fn open(&self) -> std::io::Result<TcpStream> {
        let s = TcpStream::connect(self.addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Sends one request and reads its answer. A broken connection is reopened on the next call.
    /// A kept-alive connection that the server closed while it sat idle (the sidecar does after
    /// `limits.header_timeout_ms`, and this benchmark's connections wait through other phases)
    /// is reopened and the request sent again once, as HTTP clients do for GET and PUT.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Reply> {
        let reused = self.stream.is_some();
        let mut r = self.exchange(method, path, body).await;
        if reused && r.as_ref().is_err_and(closed_by_peer) {
            self.stream = None;
            r = self.exchange(method, path, body).await;
        }
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Reply> {
        if self.stream.is_none() {
            self.stream = Some(self.open().await?);
        }
        let stream = self.stream.as_mut().expect("connected");
        self.req.clear();
        write!(self.req, "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n")?;
        if let Some(b) = body {
            write!(
                self.req,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                b.len()
            )?;
        }
        self.req.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            self.req.extend_from_slice(b);
        }
        stream.write_all(&self.req).await?;

        self.buf.clear();
        let mut scanned = 0;
        let head_end = loop {
            if let Some(p) = find(&self.buf[scanned..], b"\r\n\r\n") {
                break scanned + p + 4;
            }
            scanned = self.buf.len().saturating_sub(3);
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| std::io::Error::other("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let mut length = 0usize;
        let mut cache = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .parse()
                    .map_err(|_| std::io::Error::other("bad content-length"))?;
            } else if name.eq_ignore_ascii_case("x-wtc-cache") {
                cache = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(std::io::Error::other("chunked answers are not supported"));
            }
        }
        let total = head_end + length;
        while self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(Reply {
            status,
            cache,
            body_len: length,
        })
    }
}

fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
