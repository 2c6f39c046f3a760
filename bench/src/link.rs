//! The line to the upstream, as the outage scenario cuts it: a TCP relay on loopback that
//! both targets reach the upstream through. Down, it closes every connection it carries and
//! refuses new ones (accepted and closed at once, as a lost route looks to a client that
//! retries); up, it relays again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Link {
    pub port: u16,
    up: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Link {
    pub async fn start(upstream: u16) -> anyhow::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let carried: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (up, carried) = (up.clone(), carried.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    carried
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(relay);
                }
            })
        };
        Ok(Link {
            port,
            up,
            carried,
            accept,
        })
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for relay in self
                .carried
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain(..)
            {
                relay.abort();
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.set_up(false);
        self.accept.abort();
    }
}
