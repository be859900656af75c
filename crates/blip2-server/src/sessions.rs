//! Conversations kept between `/api/ask` requests: the encoded image, the question
//! template and the turns so far. Owned by the worker thread, so no locking is needed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blip2_pipeline::{ImageFeatures, QuestionTemplate};

use crate::error::ApiError;

/// One kept conversation.
#[derive(Debug)]
pub(crate) struct Session {
    pub features: ImageFeatures,
    pub template: QuestionTemplate,
    pub turns: Vec<(String, String)>,
}

/// At most `capacity` sessions; adding one more evicts the least recently used.
#[derive(Debug)]
pub(crate) struct SessionStore {
    capacity: usize,
    sessions: HashMap<String, (u64, Session)>,
    /// Counts insertions; a session's stamp is the count when it was last put back.
    clock: u64,
    /// The number of sessions, readable from other threads for `/api/health`.
    count: Arc<AtomicUsize>,
}

impl SessionStore {
    pub fn new(capacity: usize, count: Arc<AtomicUsize>) -> Self {
        Self {
            capacity,
            sessions: HashMap::new(),
            clock: 0,
            count,
        }
    }

    /// The maximum number of sessions kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Draws a new random session id: 128 bits as 32 hex digits.
    pub fn new_id() -> Result<String, ApiError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| ApiError::internal(format!("cannot draw a session id: {e}")))?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Stores `session` under `id` as the most recently used; returns the id evicted to
    /// make room, if any.
    pub fn insert(&mut self, id: String, session: Session) -> Option<String> {
        let mut evicted = None;
        if !self.sessions.contains_key(&id) && self.sessions.len() >= self.capacity {
            let oldest = self
                .sessions
                .iter()
                .min_by_key(|(_, (stamp, _))| *stamp)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.sessions.remove(&oldest);
                evicted = Some(oldest);
            }
        }
        self.clock += 1;
        self.sessions.insert(id, (self.clock, session));
        self.count.store(self.sessions.len(), Ordering::Relaxed);
        evicted
    }

    /// Takes the session out while a question about it is answered; put it back with
    /// [`SessionStore::insert`].
    pub fn take(&mut self, id: &str) -> Option<Session> {
        let session = self.sessions.remove(id).map(|(_, session)| session);
        self.count.store(self.sessions.len(), Ordering::Relaxed);
        session
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn session() -> Session {
        let empty = Tensor::zeros((1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        Session {
            features: ImageFeatures {
                vision: empty.clone(),
                queries: empty,
                projection: None,
                language_inputs: None,
            },
            template: QuestionTemplate::default(),
            turns: Vec::new(),
        }
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut store = SessionStore::new(2, Arc::clone(&count));
        assert_eq!(store.insert("a".into(), session()), None);
        assert_eq!(store.insert("b".into(), session()), None);
        // Using "a" makes "b" the least recently used.
        let a = store.take("a").unwrap();
        assert_eq!(store.insert("a".into(), a), None);
        assert_eq!(store.insert("c".into(), session()), Some("b".into()));
        assert!(store.take("b").is_none());
        assert!(store.take("a").is_some());
        assert_eq!(count.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn ids_are_random_hex() {
        let first = SessionStore::new_id().unwrap();
        let second = SessionStore::new_id().unwrap();
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()), "{first}");
        assert_ne!(first, second);
    }
}
