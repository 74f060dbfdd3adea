//! A future that is polled again at once when it wakes itself.
//!
//! hyper's connections wake their own task while it runs (a request body's
//! channel is fed by the connection that reads it, in the same task). tokio
//! takes a task woken during its own poll for one that yielded: it queues it
//! behind the others and wakes a sleeping worker to share the work. One call
//! at a time, that is a worker woken on every call for nothing, on a machine
//! with two cores. [`Repoll`] catches those wakes and polls the future again
//! in place, a few times at most; a wake from elsewhere, or past that limit,
//! goes to the task's waker as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// How many times one poll of the task may poll the future again: past it,
/// the task yields as it would have (hyper yields on purpose after a burst
/// of work, and tokio's budget makes sockets return `Pending` once spent).
const MAX_REPOLLS: u32 = 4;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

struct Signal {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // While the future is being polled, note the wake: the poll loop
        // polls it again. Otherwise wake the task.
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            match state {
                POLLING => match self.state.compare_exchange_weak(
                    POLLING,
                    WOKEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return,
                    Err(now) => state = now,
                },
                WOKEN => return,
                _ => {
                    self.task.wake();
                    return;
                }
            }
        }
    }
}

/// `future`, polled again in place when it wakes itself during a poll.
pub struct Repoll<F> {
    future: Pin<Box<F>>,
    signal: Arc<Signal>,
    waker: Waker,
}

impl<F: Future> Repoll<F> {
    pub fn new(future: F) -> Self {
        let signal = Arc::new(Signal {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        Repoll {
            future: Box::pin(future),
            waker: Waker::from(signal.clone()),
            signal,
        }
    }
}

impl<F: Future> Future for Repoll<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.signal.task.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        let mut repolls = 0;
        loop {
            this.signal.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(output) = this.future.as_mut().poll(&mut inner) {
                this.signal.state.store(IDLE, Ordering::Release);
                return Poll::Ready(output);
            }
            match this.signal.state.compare_exchange(
                POLLING,
                IDLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                // Nobody woke it: wait for a wake from outside.
                Ok(_) => return Poll::Pending,
                // Woken during the poll (by itself or by another thread).
                Err(_) if repolls < MAX_REPOLLS => repolls += 1,
                Err(_) => {
                    this.signal.state.store(IDLE, Ordering::Release);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A future that wakes itself `n` times during its polls, then is ready.
    struct SelfWaking {
        left: u32,
        polls: u32,
    }
    impl Future for SelfWaking {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            self.polls += 1;
            if self.left == 0 {
                return Poll::Ready(self.polls);
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn self_wakes_are_polled_in_place_up_to_the_limit() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut future = Repoll::new(SelfWaking { left: 2, polls: 0 });
        assert_eq!(Pin::new(&mut future).poll(&mut cx), Poll::Ready(3));
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "no wake reached the task"
        );

        // More self-wakes than the limit: the task is woken to yield.
        let mut future = Repoll::new(SelfWaking {
            left: MAX_REPOLLS + 3,
            polls: 0,
        });
        assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task yields");
        assert_eq!(
            Pin::new(&mut future).poll(&mut cx),
            Poll::Ready(MAX_REPOLLS + 4)
        );
    }

    #[test]
    fn a_wake_from_outside_reaches_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut future = Repoll::new(rx);
        assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        std::thread::spawn(move || tx.send(7).unwrap())
            .join()
            .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(Pin::new(&mut future).poll(&mut cx), Poll::Ready(Ok(7)));
    }
}
