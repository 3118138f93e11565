//! Bounds on how long a connection may hold a server slot without making
//! progress (issue 12, fault 2): a peer that connects and sends nothing,
//! sends half a header, trickles a body a byte at a time, goes silent, or
//! stops reading its replies would otherwise keep its slot for good.
//!
//! The connection loop checks these bounds on a coarse tick
//! ([`Liveness::tick`]) rather than with a timer reset per frame: resetting
//! a timer costs a timer-wheel update per frame on the hot path, while a
//! tick costs one wake-up a second per connection. A bound is therefore
//! enforced within one tick after it passes.

use std::time::Duration;

use bytes::BytesMut;
use rpc_codec::{CodecError, Frame, FrameCodec};
use rpc_core::ServerConfig;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

/// The three bounds, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// From accept to the first complete frame.
    pub(crate) first_frame: Duration,
    /// Inside one partly received frame.
    pub(crate) frame: Duration,
    /// Without a frame from the peer, or without it taking our replies.
    pub(crate) idle: Duration,
}

impl Limits {
    pub(crate) fn from_config(c: &ServerConfig) -> Self {
        Self {
            first_frame: c.first_frame_timeout(),
            frame: c.frame_timeout(),
            idle: c.idle_timeout(),
        }
    }

    /// How often the connection loop checks: often enough that no bound is
    /// overrun by more than a quarter of the shortest one, and at most once
    /// a second.
    pub(crate) fn tick(&self) -> Duration {
        (self.first_frame.min(self.frame).min(self.idle) / 4)
            .clamp(Duration::from_millis(1), Duration::from_secs(1))
    }
}

/// A frame partly received: when it began, and how far it had got when.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Partial {
    /// When its first bytes arrived.
    pub(crate) since: Instant,
    /// Bytes of it buffered at the last read.
    pub(crate) bytes: usize,
    /// When the last bytes of it arrived.
    pub(crate) grew_at: Instant,
}

/// Slowest a frame may arrive once it has taken [`Limits::frame`]: 1 KiB/s.
/// A large request over a slow link is several hundred times faster (8 MiB
/// in 10 s is 800 KiB/s); a peer dribbling bytes to hold a slot is slower.
pub(crate) const MIN_FRAME_RATE: usize = 1024;

/// [`FrameCodec`] that also notes how a partly received frame progresses.
/// The clock is read only when a read ends inside a frame.
#[derive(Debug)]
pub(crate) struct TimedCodec {
    inner: FrameCodec,
    partial: Option<Partial>,
}

impl TimedCodec {
    pub(crate) fn new(max_frame_len: usize) -> Self {
        Self {
            inner: FrameCodec::new(max_frame_len),
            partial: None,
        }
    }

    /// The frame being received, if a read ended inside one.
    pub(crate) fn partial(&self) -> Option<Partial> {
        self.partial
    }

    /// Forgets the partial frame's timing: while the server itself does not
    /// read (its own in-flight limit), the rest of the frame may be waiting
    /// in the socket, and the time is not the peer's.
    pub(crate) fn excuse(&mut self) {
        self.partial = None;
    }
}

impl Decoder for TimedCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let out = self.inner.decode(src)?;
        if out.is_some() || src.is_empty() {
            self.partial = None;
        } else {
            let now = Instant::now();
            match &mut self.partial {
                Some(p) if p.bytes != src.len() => {
                    p.bytes = src.len();
                    p.grew_at = now;
                }
                Some(_) => {}
                None => {
                    self.partial = Some(Partial {
                        since: now,
                        bytes: src.len(),
                        grew_at: now,
                    })
                }
            }
        }
        Ok(out)
    }
}

/// Why a connection made no progress for too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stalled {
    /// No complete frame since the connection was accepted.
    NoFirstFrame(Duration),
    /// A frame stayed partly received.
    PartialFrame(Duration),
    /// No frame at all, not even a heartbeat.
    Idle(Duration),
    /// Replies waiting, and the peer took none of them.
    NotReading(Duration),
}

impl Stalled {
    /// Whether the peer can still take replies: it gets a go-away, and the
    /// replies to the calls already read, before the close. Only a peer
    /// that reads nothing is closed outright.
    pub(crate) fn is_graceful(self) -> bool {
        !matches!(self, Stalled::NotReading(_))
    }
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stalled::NoFirstFrame(d) => write!(
                f,
                "no complete frame within {d:?} of connecting (server.first_frame_timeout_ms)"
            ),
            Stalled::PartialFrame(d) => write!(
                f,
                "a frame stopped arriving for {d:?}, or arrived slower than {MIN_FRAME_RATE} bytes/s after it (server.frame_timeout_ms)"
            ),
            Stalled::Idle(d) => write!(
                f,
                "no frame, not even a heartbeat, for {d:?} (server.idle_timeout_ms)"
            ),
            Stalled::NotReading(d) => write!(
                f,
                "the peer took none of its replies for {d:?} (server.idle_timeout_ms)"
            ),
        }
    }
}

/// Progress bookkeeping of one connection. The loop counts frames and
/// written bytes (no clock); [`Progress::check`] turns the counts into
/// times at each tick.
#[derive(Debug)]
pub(crate) struct Progress {
    limits: Limits,
    opened: Instant,
    /// Frames read so far.
    pub(crate) frames: u64,
    /// Bytes written so far.
    pub(crate) written: u64,
    seen_frames: u64,
    seen_written: u64,
    /// When the last check saw progress (or an excuse).
    active_at: Instant,
}

/// What the connection loop was doing when the tick came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reading {
    /// Waiting for the peer's next frame.
    Open,
    /// Not reading because of the server's own per-connection in-flight
    /// limit: time passing is not the peer's doing.
    HeldBySelf,
    /// Not reading until the peer takes the replies waiting for it.
    HeldByPeer,
    /// Not reading any more (shutting down or closing).
    Stopped,
}

impl Progress {
    pub(crate) fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            opened: now,
            frames: 0,
            written: 0,
            seen_frames: 0,
            seen_written: 0,
            active_at: now,
        }
    }

    /// Checks the bounds at a tick; `Err` names the one that was overrun.
    pub(crate) fn check(
        &mut self,
        reading: Reading,
        codec: &mut TimedCodec,
    ) -> Result<(), Stalled> {
        let now = Instant::now();
        let progressed = self.frames != self.seen_frames || self.written != self.seen_written;
        self.seen_frames = self.frames;
        self.seen_written = self.written;
        if progressed {
            self.active_at = now;
        }
        let l = self.limits;
        match reading {
            Reading::Stopped => Ok(()),
            Reading::HeldBySelf => {
                self.active_at = now;
                codec.excuse();
                Ok(())
            }
            Reading::HeldByPeer => {
                if now.duration_since(self.active_at) >= l.idle {
                    return Err(Stalled::NotReading(l.idle));
                }
                codec.excuse();
                Ok(())
            }
            Reading::Open => {
                if let Some(p) = codec.partial() {
                    // Inside a frame: it must keep arriving (no stall as
                    // long as the bound), and once it has taken that long,
                    // at a rate a real link manages. A large frame over a
                    // slow link passes both; a dribbling peer does not.
                    let took = now.duration_since(p.since);
                    let stalled = now.duration_since(p.grew_at) >= l.frame;
                    let slow = took >= l.frame
                        && (p.bytes as f64) < took.as_secs_f64() * MIN_FRAME_RATE as f64;
                    if stalled || slow {
                        return Err(Stalled::PartialFrame(l.frame));
                    }
                    return Ok(());
                }
                if self.frames == 0 && now.duration_since(self.opened) >= l.first_frame {
                    return Err(Stalled::NoFirstFrame(l.first_frame));
                }
                if self.frames > 0 && now.duration_since(self.active_at) >= l.idle {
                    return Err(Stalled::Idle(l.idle));
                }
                Ok(())
            }
        }
    }
}
