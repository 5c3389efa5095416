//! Where a UNet step's wall time goes, by candle's own tracing spans.
//!
//! candle-transformers opens a `tracing` span in every block of the SD models
//! (`resnet2d`, `conv2d`, `spatial-transformer`, `basic-transformer`, `xa`,
//! `xa-attn`, `xa-softmax`, `ff`, `geglu`, ...), and kiln's UNet one named
//! `unet`. CPU ops are synchronous: the calling thread waits in the span while
//! rayon's threads compute, so a span's wall time is the time its work took.
//! [`SpanProfiler`] records, per span name, the time inside the span less the
//! time inside its child spans ("self" time), which separates convolutions
//! from the group norms and activations around them (`resnet2d`'s self time),
//! attention's score/softmax/value products (`xa-attn`, `xa-softmax`) from its
//! projections (`xa`), and so on. perf profiles cannot make that split: the
//! work runs on rayon's threads, whose stacks do not reach the caller.
//!
//! A span reports to the subscriber that was current when it was created, and
//! candle creates them when a module is built: build the pipeline inside
//! [`SpanProfiler::install`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::span::Id;
use tracing::{Subscriber, subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// Wall time spent in one span name.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpanTime {
    /// The span's name (`resnet2d`, `conv2d`, ...).
    pub name: &'static str,
    /// How often it was entered.
    pub calls: u64,
    /// Time inside it, children included.
    pub total: Duration,
    /// Time inside it less the time inside its child spans.
    pub self_time: Duration,
}

/// Times per span name, shared between the layer and the profiler.
type Times = Arc<Mutex<BTreeMap<&'static str, SpanTime>>>;

thread_local! {
    /// Entered spans of this thread: when each was entered and its children's time so far.
    static STACK: RefCell<Vec<(Instant, Duration)>> = const { RefCell::new(Vec::new()) };
}

/// Records span times (see the module docs); build models inside [`SpanProfiler::install`].
#[derive(Clone, Debug, Default)]
pub struct SpanProfiler {
    times: Times,
}

/// The `tracing` layer behind [`SpanProfiler`].
struct TimingLayer {
    times: Times,
}

impl<S> Layer<S> for TimingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_enter(&self, _id: &Id, _ctx: Context<'_, S>) {
        STACK.with(|s| s.borrow_mut().push((Instant::now(), Duration::ZERO)));
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some((start, children)) = STACK.with(|s| s.borrow_mut().pop()) else {
            return;
        };
        let total = start.elapsed();
        STACK.with(|s| {
            if let Some(parent) = s.borrow_mut().last_mut() {
                parent.1 += total;
            }
        });
        let Some(name) = ctx.metadata(id).map(|m| m.name()) else {
            return;
        };
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let entry = times.entry(name).or_insert(SpanTime {
            name,
            ..SpanTime::default()
        });
        entry.calls += 1;
        entry.total += total;
        entry.self_time += total.saturating_sub(children);
    }
}

impl SpanProfiler {
    /// Returns a profiler with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` with this profiler as the current thread's subscriber (every span
    /// level enabled); spans created inside report to it from then on, on any thread.
    pub fn install<T>(&self, f: impl FnOnce() -> T) -> T {
        let layer = TimingLayer {
            times: Arc::clone(&self.times),
        };
        let subscriber = tracing_subscriber::registry().with(layer.with_filter(LevelFilter::TRACE));
        subscriber::with_default(subscriber, f)
    }

    /// Forgets everything recorded so far (call after a warm-up).
    pub fn reset(&self) {
        self.times.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Returns the recorded times, largest self time first.
    pub fn times(&self) -> Vec<SpanTime> {
        let times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SpanTime> = times.values().copied().collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.self_time));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_time_excludes_children() {
        let profiler = SpanProfiler::new();
        let (outer, inner) =
            profiler.install(|| (tracing::trace_span!("outer"), tracing::trace_span!("inner")));
        {
            let _o = outer.enter();
            std::thread::sleep(Duration::from_millis(5));
            for _ in 0..2 {
                let _i = inner.enter();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let times = profiler.times();
        let get = |n: &str| times.iter().find(|t| t.name == n).copied();
        let (o, i) = (get("outer"), get("inner"));
        let (Some(o), Some(i)) = (o, i) else {
            panic!("spans not recorded: {times:?}");
        };
        assert_eq!((o.calls, i.calls), (1, 2));
        assert!(i.total >= Duration::from_millis(10));
        assert_eq!(o.self_time + i.total, o.total);
        profiler.reset();
        assert!(profiler.times().is_empty());
    }
}
