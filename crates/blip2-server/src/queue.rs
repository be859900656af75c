//! The bounded job queue in front of the model worker, with the state each job moves
//! through and a pause switch for tests and maintenance.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::worker::Job;

/// The number of waiting jobs and whether the worker has taken one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStatus {
    /// Jobs accepted and not yet taken by the worker.
    pub waiting: usize,
    /// Whether the worker has taken a job and not finished it (a paused worker that
    /// has taken a job counts as busy).
    pub busy: bool,
}

/// The sending side of the queue, shared by the request handlers.
#[derive(Debug)]
pub(crate) struct JobQueue {
    /// `None` once the server has stopped accepting jobs.
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    status: watch::Sender<QueueStatus>,
    /// Recent job duration in seconds (exponential moving average), for `Retry-After`.
    average_seconds: Mutex<f64>,
    capacity: usize,
}

/// Weight of the newest job in the moving average of job durations.
const AVERAGE_WEIGHT: f64 = 0.2;
/// `Retry-After` estimates are kept within these bounds, in seconds.
const RETRY_AFTER_RANGE: (u64, u64) = (1, 600);

impl JobQueue {
    /// A queue of `capacity` waiting jobs and the receiver the worker takes them from.
    pub fn new(capacity: usize) -> (Arc<Self>, mpsc::Receiver<Job>) {
        let (sender, receiver) = mpsc::channel(capacity);
        let (status, _) = watch::channel(QueueStatus::default());
        let queue = Self {
            sender: Mutex::new(Some(sender)),
            status,
            average_seconds: Mutex::new(1.0),
            capacity,
        };
        (Arc::new(queue), receiver)
    }

    /// Queues `job`, or returns `503 queue_full` with a `Retry-After` estimate.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        // Counted before sending, so the worker never takes a job it has not seen counted.
        // Both happen under the sender's lock, so a counted job is in the channel before
        // another request can send, and a request that sees a full count finds the channel full.
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        self.status.send_modify(|status| status.waiting += 1);
        let sent = match &*sender {
            Some(sender) => sender.try_send(job),
            None => Err(mpsc::error::TrySendError::Closed(job)),
        };
        if sent.is_err() {
            self.status.send_modify(|status| status.waiting -= 1);
        }
        drop(sender);
        match sent {
            Ok(()) => Ok(()),
            Err(error) => Err(match error {
                mpsc::error::TrySendError::Full(_) => ApiError::over_limit(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_full",
                    "queue_size",
                    self.capacity,
                    format!(
                        "the model is busy and {} requests are already waiting (the limit, set by \
                             --queue-size); try again after the Retry-After seconds",
                        self.capacity
                    ),
                )
                .with_retry_after(self.retry_after()),
                mpsc::error::TrySendError::Closed(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the server is shutting down and takes no new requests",
                ),
            }),
        }
    }

    /// `503 request_timeout`: a job waited longer than `timeout` and was not started.
    pub fn timeout_error(&self, timeout: Duration) -> ApiError {
        ApiError::over_limit(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            "request_timeout_secs",
            timeout.as_secs_f64(),
            format!(
                "the request waited {:.1} s for the model, this server's limit (set by \
                 --request-timeout-secs), and was not started; try again after the Retry-After seconds",
                timeout.as_secs_f64()
            ),
        )
        .with_retry_after(self.retry_after())
    }

    /// Accepts no more jobs; the worker finishes the queued ones and stops.
    pub fn close(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Seconds until the jobs ahead of a new one are likely done, from recent job durations.
    pub fn retry_after(&self) -> u64 {
        let status = *self.status.borrow();
        let ahead = status.waiting + usize::from(status.busy);
        let average = *self
            .average_seconds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let estimate = (average * ahead.max(1) as f64).ceil() as u64;
        estimate.clamp(RETRY_AFTER_RANGE.0, RETRY_AFTER_RANGE.1)
    }

    /// The current status.
    pub fn status(&self) -> QueueStatus {
        *self.status.borrow()
    }

    /// A receiver notified of every status change.
    pub fn subscribe(&self) -> watch::Receiver<QueueStatus> {
        self.status.subscribe()
    }

    /// The maximum number of waiting jobs.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Called by the worker when it takes a job from the queue.
    pub fn job_taken(&self) {
        self.status.send_modify(|status| {
            status.waiting -= 1;
            status.busy = true;
        });
    }

    /// Called by the worker when a job is done or skipped; `ran` is how long it computed.
    pub fn job_done(&self, ran: Option<Duration>) {
        if let Some(ran) = ran {
            let mut average = self
                .average_seconds
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *average = (1.0 - AVERAGE_WEIGHT) * *average + AVERAGE_WEIGHT * ran.as_secs_f64();
        }
        self.status.send_modify(|status| status.busy = false);
    }
}

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;

/// Whether a job may still start. The worker and the request handler race to move it
/// out of "queued": the worker to "running", the handler (timeout or client gone) to
/// "cancelled". Whichever moves it first decides.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ticket(Arc<AtomicU8>);

impl Ticket {
    /// Marks the job running; false when it was cancelled first.
    pub fn try_start(&self) -> bool {
        self.transition(RUNNING)
    }

    /// Marks the job cancelled; false when it was already running.
    pub fn try_cancel(&self) -> bool {
        self.transition(CANCELLED)
    }

    fn transition(&self, to: u8) -> bool {
        self.0
            .compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Cancels a job that has not started when the request handler goes away (the client
/// disconnected, or the handler returned an error).
#[derive(Debug)]
pub(crate) struct CancelOnDrop(pub Ticket);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.try_cancel();
    }
}

/// The switch that stops the worker before it starts its next job.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    pauses: Mutex<usize>,
    changed: Condvar,
}

impl Gate {
    /// Blocks the calling thread while any [`WorkerPause`] is alive.
    pub fn wait_until_open(&self) {
        let pauses = self
            .pauses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _open = self
            .changed
            .wait_while(pauses, |pauses| *pauses > 0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }

    pub fn pause(self: &Arc<Self>) -> WorkerPause {
        *self
            .pauses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        WorkerPause {
            gate: Arc::clone(self),
        }
    }
}

/// While a `WorkerPause` is alive, the worker starts no job: the next job it takes waits
/// (the worker counts as busy), later ones wait in the queue. Dropping it resumes the worker.
/// Meant for tests that need a busy worker, and for maintenance; HTTP cannot reach it.
#[derive(Debug)]
#[must_use = "the worker resumes as soon as the pause is dropped"]
pub struct WorkerPause {
    gate: Arc<Gate>,
}

impl Drop for WorkerPause {
    fn drop(&mut self) {
        let mut pauses = self
            .gate
            .pauses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *pauses -= 1;
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_starts_or_cancels_once() {
        let started = Ticket::default();
        assert!(started.try_start());
        assert!(!started.try_cancel(), "a running job was cancelled");

        let cancelled = Ticket::default();
        assert!(cancelled.try_cancel());
        assert!(!cancelled.try_start(), "a cancelled job started");
    }

    #[test]
    fn gate_opens_when_last_pause_drops() {
        let gate = Arc::new(Gate::default());
        let first = gate.pause();
        let second = gate.pause();
        let (sender, receiver) = std::sync::mpsc::channel();
        let waiter = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                gate.wait_until_open();
                sender.send(()).unwrap();
            })
        };
        drop(first);
        assert!(
            receiver.try_recv().is_err(),
            "the gate opened with a pause still alive"
        );
        drop(second);
        receiver.recv().unwrap();
        waiter.join().unwrap();
    }

    #[test]
    fn retry_after_scales_with_queue() {
        let (queue, _receiver) = JobQueue::new(4);
        queue.job_done(Some(Duration::from_secs(10)));
        // Average (1.0 * 0.8 + 10 * 0.2) = 2.8 s, one job ahead at least.
        assert_eq!(queue.retry_after(), 3);
        queue.status.send_modify(|status| {
            status.waiting = 3;
            status.busy = true;
        });
        assert_eq!(queue.retry_after(), 12);
    }
}
