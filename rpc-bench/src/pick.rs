//! `rpc-bench pick`: the consumer's hot path before any I/O — discovery
//! lookup plus load-balancer pick (ejected instances skipped) — timed, and
//! its allocations counted.
//!
//! Ten instances are registered in an in-process memory registry (no
//! server: nothing is dialled), then `ServiceClient::next_endpoint` runs a
//! million times per balancer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rpc::registry::{AnyRegistry, MemoryRegistry};
use rpc::{ClientConfig, Consumer, LoadBalancerKind, ServiceMetaInfo};
use rpc_core::Registry;

/// Counts allocations while [`COUNTING`] is on; otherwise one relaxed load
/// on top of the system allocator.
pub struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

const ITERATIONS: u32 = 1_000_000;

pub fn run() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let registry = MemoryRegistry::new();
        let mut registrations = Vec::new();
        for i in 0..10u16 {
            let meta = ServiceMetaInfo::new("Pick", "1.0", "127.0.0.1", 20_000 + i);
            registrations.push(registry.register(meta).await.map_err(|e| e.to_string())?);
        }
        println!("| balancer | ns per pick | allocations per pick |");
        println!("|---|---:|---:|");
        for kind in [
            LoadBalancerKind::RoundRobin,
            LoadBalancerKind::Random,
            LoadBalancerKind::Weighted,
            LoadBalancerKind::ConsistentHash,
            LoadBalancerKind::P2c,
        ] {
            let config = ClientConfig {
                load_balancer: kind,
                ..ClientConfig::default()
            };
            let consumer = Consumer::with_registry(
                AnyRegistry::from(registry.clone()),
                config,
                Duration::from_secs(5),
            );
            let client = consumer.service("Pick", "1.0");
            // Warm up: the first lookups follow the service and build the set.
            for _ in 0..1000 {
                client.next_endpoint().await.map_err(|e| e.to_string())?;
            }
            ALLOCATIONS.store(0, Ordering::Relaxed);
            COUNTING.store(true, Ordering::Relaxed);
            let started = Instant::now();
            for _ in 0..ITERATIONS {
                let ep = client.next_endpoint().await.map_err(|e| e.to_string())?;
                std::hint::black_box(ep);
            }
            let took = started.elapsed();
            COUNTING.store(false, Ordering::Relaxed);
            let allocs = ALLOCATIONS.load(Ordering::Relaxed);
            println!(
                "| {kind:?} | {:.0} | {:.3} |",
                took.as_nanos() as f64 / f64::from(ITERATIONS),
                allocs as f64 / f64::from(ITERATIONS)
            );
        }
        drop(registrations);
        Ok(())
    })
}
