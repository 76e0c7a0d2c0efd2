//! Streaming generators: a remote function returning `impl Iterator<Item =
//! T>` or `impl Stream<Item = T>` gives its caller an
//! [`ObjectRefGenerator<T>`], each item its own object, available as soon
//! as it is yielded.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use shoal_proto::Address;

use crate::core::generator::{Generator, Next};
use crate::core::{self, Core};
use crate::error::Result;
use crate::object_ref::ObjectRef;
use crate::registry::{encode_return, Invocation, InvokeError};

/// The items of a streaming generator task, in the order they were
/// yielded: an `Iterator` (blocking) and a `Stream` of
/// `shoal::Result<ObjectRef<T>>`. An error or panic in the producer is the
/// last item. Dropping it stops the producer (its task is cancelled) and
/// frees the items not taken.
///
/// ```no_run
/// #[shoal::remote]
/// fn squares(n: u64) -> impl Iterator<Item = u64> {
///     (0..n).map(|i| i * i)
/// }
///
/// # fn main() -> shoal::Result<()> {
/// for square in squares::remote(10) {
///     println!("{}", square?.get()?);
/// }
/// # Ok(()) }
/// ```
pub struct ObjectRefGenerator<T> {
    core: Arc<Core>,
    generator: Arc<Generator>,
    owner: std::sync::Arc<Address>,
    /// The task's own result (the item count): held while the generator
    /// lives.
    _result: ObjectRef<u32>,
    /// The `Stream` side's wait for the next item.
    waiting: Option<Pin<Box<dyn Future<Output = Next> + Send>>>,
    _type: PhantomData<fn() -> T>,
}

impl<T> ObjectRefGenerator<T> {
    pub(crate) fn new(core: Arc<Core>, generator: Arc<Generator>, result: ObjectRef<u32>) -> Self {
        Self {
            owner: std::sync::Arc::clone(&core.me_shared),
            core,
            generator,
            _result: result,
            waiting: None,
            _type: PhantomData,
        }
    }

    /// The generator task's id.
    pub fn task_id(&self) -> shoal_proto::TaskId {
        self.generator.task_id
    }

    fn item(&self, next: Next) -> Option<Result<ObjectRef<T>>> {
        match next {
            Next::Item(id) => Some(Ok(ObjectRef::adopt(id, std::sync::Arc::clone(&self.owner)))),
            Next::Failed(e) => Some(Err(e)),
            Next::End => None,
        }
    }
}

impl<T> Iterator for ObjectRefGenerator<T> {
    type Item = Result<ObjectRef<T>>;

    /// Blocks until the next item is yielded (or the producer ends).
    fn next(&mut self) -> Option<Self::Item> {
        let generator = Arc::clone(&self.generator);
        match self
            .core
            .block_on(async move { Ok(generator.next().await) })
        {
            Ok(next) => self.item(next),
            Err(e) => Some(Err(e)),
        }
    }
}

impl<T> Stream for ObjectRefGenerator<T> {
    type Item = Result<ObjectRef<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let waiting = this.waiting.get_or_insert_with(|| {
            let generator = Arc::clone(&this.generator);
            Box::pin(async move { generator.next().await })
        });
        match waiting.as_mut().poll(cx) {
            Poll::Ready(next) => {
                this.waiting = None;
                Poll::Ready(this.item(next))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T> Drop for ObjectRefGenerator<T> {
    fn drop(&mut self) {
        self.core.drop_generator(&self.generator);
    }
}

/// The running generator task's id and its process.
fn producing() -> std::result::Result<(Arc<Core>, shoal_proto::TaskId), InvokeError> {
    let task = crate::worker::context::current_task()
        .ok_or_else(|| InvokeError::app(&"a generator's items are yielded inside its task"))?;
    let core = core::get().map_err(|e| InvokeError::app(&e))?;
    Ok((core, task))
}

/// Runs a sync generator: yields each item to the owner, in turn, waiting
/// while the caller is behind; stops when the caller drops the generator
/// or the task is cancelled. Its result is the item count.
pub fn drive_iter<T: Serialize, I: IntoIterator<Item = T>>(items: I) -> Invocation {
    let (core, task) = producing()?;
    let mut index = 0u32;
    for item in items {
        let bytes = encode_return(&item)?;
        let stop = core
            .block_on(Arc::clone(&core).yield_item(task, index, bytes))
            .map_err(|e| InvokeError::app(&e))?;
        index += 1;
        if stop || crate::worker::Process::cancels(&*core).is_cancelled(task) {
            break;
        }
    }
    encode_return(&index)
}

/// [`drive_iter`] for a `Stream`.
pub async fn drive_stream<T: Serialize, S: Stream<Item = T>>(items: S) -> Invocation {
    let (core, task) = producing()?;
    let mut items = std::pin::pin!(items);
    let mut index = 0u32;
    while let Some(item) = items.next().await {
        let bytes = encode_return(&item)?;
        let stop = Arc::clone(&core)
            .yield_item(task, index, bytes)
            .await
            .map_err(|e| InvokeError::app(&e))?;
        index += 1;
        if stop {
            break;
        }
    }
    encode_return(&index)
}
