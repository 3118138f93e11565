//! A compression bomb is refused within the frame limit: the test counts
//! every byte Rust allocates while the decoder works on a 32 KiB zstd frame
//! that expands to 1 GiB, on zstd frames that lie about their size, and on
//! an lz4 body that announces 4 GiB. Its own binary, because the counting
//! allocator is global. (libzstd's own context is allocated by C and not
//! counted; its window is capped by the decoder.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use rpc_codec::CodecError;
use rpc_codec::compression::decompress;
use rpc_core::Compression;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One Zstandard frame (RFC 8878) of `blocks` RLE blocks of 128 KiB of
/// zeros each, written by hand so the test needs no gigabyte to build it:
/// magic, a descriptor with no content size, a 128 KiB window, then
/// 4 bytes per block.
fn zstd_rle_bomb(blocks: usize) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD];
    f.push(0x00); // no single segment, no checksum, no dictionary, no size
    f.push(7 << 3); // window log 10 + 7 = 17: 128 KiB
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let header = last | (1 << 1) | ((128 * 1024) << 3); // RLE block
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.push(0);
    }
    f
}

/// Tests run on parallel threads: one measurement at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn peak_while<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

#[test]
fn a_one_gib_zstd_bomb_is_refused_within_the_limit() {
    const LIMIT: usize = 8 * 1024 * 1024;
    let bomb = zstd_rle_bomb(8192);
    assert!(bomb.len() < 40 * 1024, "{} bytes", bomb.len());
    // The frame is honest: a small one decodes to its zeros.
    let small = decompress(Compression::Zstd, &zstd_rle_bomb(2), LIMIT).unwrap();
    assert_eq!(small.len(), 256 * 1024);
    assert!(small.iter().all(|&b| b == 0));

    let (outcome, peak) = peak_while(|| decompress(Compression::Zstd, &bomb, LIMIT));
    let e = outcome.unwrap_err();
    assert!(
        matches!(e, CodecError::DecompressedTooLarge { max: LIMIT, .. }),
        "{e}"
    );
    // The output may reach the limit (plus a block and the window), never
    // the gigabyte the frame expands to.
    assert!(peak < 3 * LIMIT, "allocated {peak} bytes at peak");
}

#[test]
fn an_lz4_body_announcing_4_gib_allocates_nothing_large() {
    let mut lie = u32::MAX.to_le_bytes().to_vec();
    lie.extend_from_slice(&[0x1F, 0x00, 0x01, 0x00]);
    let (outcome, peak) = peak_while(|| decompress(Compression::Lz4, &lie, usize::MAX));
    assert!(outcome.is_err());
    assert!(peak < 64 * 1024, "allocated {peak} bytes at peak");
}

/// A zstd frame whose header announces a content size: one RLE block of
/// 128 KiB behind a single-segment header claiming `claimed` bytes.
fn zstd_sized(claimed: u32) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD];
    f.push(0b1010_0000); // 4-byte content size, single segment
    f.extend_from_slice(&claimed.to_le_bytes());
    let header = 1u32 | (1 << 1) | ((128 * 1024) << 3); // last, RLE, 128 KiB
    f.extend_from_slice(&header.to_le_bytes()[..3]);
    f.push(7);
    f
}

#[test]
fn zstd_content_sizes_that_lie_are_refused() {
    // Honest: 128 KiB of sevens.
    let out = decompress(Compression::Zstd, &zstd_sized(128 * 1024), 1 << 20).unwrap();
    assert_eq!(out.len(), 128 * 1024);
    assert!(out.iter().all(|&b| b == 7));
    // Claims 4 GiB - 1: refused from the header, nothing allocated.
    let (outcome, peak) =
        peak_while(|| decompress(Compression::Zstd, &zstd_sized(u32::MAX), 8 << 20));
    let e = outcome.unwrap_err();
    assert!(matches!(e, CodecError::DecompressedTooLarge { .. }), "{e}");
    assert!(peak < 64 * 1024, "allocated {peak} bytes at peak");
    // Claims 10 bytes, holds 128 KiB: libzstd stops at the buffer's end.
    let (outcome, peak) = peak_while(|| decompress(Compression::Zstd, &zstd_sized(10), 8 << 20));
    assert!(outcome.is_err());
    assert!(peak < 64 * 1024, "allocated {peak} bytes at peak");
}
