//! Allocator settings for the large, short-lived tensors of a diffusion loop.

/// Makes glibc's malloc keep large freed blocks for reuse. By default an allocation over its
/// (adaptive) mmap threshold gets fresh pages from the kernel, and freed memory at the top of
/// the heap goes back to it, so every activation tensor of every forward costs page faults and
/// the kernel's zeroing of its pages (8 % of a PixArt forward on 2 cores,
/// docs/performance.md). With these settings blocks up to 32 MiB come from the heap, which is
/// never trimmed: the process keeps its peak heap for its lifetime, as torch's CPU allocator
/// effectively does.
///
/// Call it at the start of `main`, before any thread starts. A no-op on other platforms.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the caller runs it before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// The most thread tags [`TaggedAllocator`] counts separately (tags 1..MAX_TAGS).
pub const MAX_TAGS: usize = 64;

std::thread_local! {
    /// This thread's tag; 0: not counted. `const`-initialised, so reading it never allocates.
    static THREAD_TAG: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

static LIVE: [std::sync::atomic::AtomicUsize; MAX_TAGS] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; MAX_TAGS];
static PEAK: [std::sync::atomic::AtomicUsize; MAX_TAGS] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; MAX_TAGS];

/// A global allocator over the system one that counts, per thread tag, the bytes allocated by
/// threads carrying the tag and not yet freed (wherever they are freed), and the peak of that
/// count: how the memory benchmarks and tests measure a rank's peak activation memory. Each
/// block carries its tag in a header before it, so a tensor allocated by one rank and freed by
/// another is debited to the first. Install it in a binary or test with
/// `#[global_allocator] static A: TaggedAllocator = TaggedAllocator;`, tag a thread with
/// [`set_thread_tag`], read [`tag_stats`]. Only allocations made on tagged threads count: run
/// a rank on a one-thread pool (`RankThreads::Each(1)`) so that all of its work is on its
/// tagged thread.
pub struct TaggedAllocator;

/// Bytes in front of every block: at least 16 (the tag in the last 8), and a multiple of the
/// block's alignment so the block stays aligned.
fn header(align: usize) -> usize {
    align.max(16)
}

fn count(tag: usize, add: usize, sub: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    if tag == 0 || tag >= MAX_TAGS {
        return;
    }
    let live = if add >= sub {
        LIVE[tag].fetch_add(add - sub, Relaxed) + (add - sub)
    } else {
        LIVE[tag].fetch_sub(sub - add, Relaxed) - (sub - add)
    };
    PEAK[tag].fetch_max(live, Relaxed);
}

// SAFETY: every block is a system block `header` bytes larger than asked, aligned to at least
// 16 and to the asked alignment; the pointer handed out is `header` bytes in, so it keeps the
// asked alignment and the 8 bytes before it (inside the header) hold the tag. `dealloc` and
// `realloc` undo the offset with the same layout arithmetic.
unsafe impl std::alloc::GlobalAlloc for TaggedAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let pre = header(layout.align());
        let Ok(full) = std::alloc::Layout::from_size_align(layout.size() + pre, pre) else {
            return std::ptr::null_mut();
        };
        let base = std::alloc::System.alloc(full);
        if base.is_null() {
            return base;
        }
        let tag = THREAD_TAG.try_with(|t| t.get()).unwrap_or(0);
        let user = base.add(pre);
        (user.sub(8) as *mut usize).write(tag);
        count(tag, layout.size(), 0);
        user
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        let pre = header(layout.align());
        let tag = (ptr.sub(8) as *const usize).read();
        count(tag, 0, layout.size());
        let full = std::alloc::Layout::from_size_align_unchecked(layout.size() + pre, pre);
        std::alloc::System.dealloc(ptr.sub(pre), full);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let pre = header(layout.align());
        let tag = (ptr.sub(8) as *const usize).read();
        let full = std::alloc::Layout::from_size_align_unchecked(layout.size() + pre, pre);
        // The system realloc keeps the header's bytes, tag included.
        let base = std::alloc::System.realloc(ptr.sub(pre), full, new_size + pre);
        if base.is_null() {
            return base;
        }
        count(tag, new_size, layout.size());
        base.add(pre)
    }
}

/// Tags this thread's allocations with `tag` (1..[`MAX_TAGS`]; 0 stops counting them).
pub fn set_thread_tag(tag: usize) {
    THREAD_TAG.with(|t| t.set(tag));
}

/// (live bytes, peak live bytes) of `tag` since the last [`reset_peak`].
pub fn tag_stats(tag: usize) -> (usize, usize) {
    use std::sync::atomic::Ordering::Relaxed;
    match tag {
        1..MAX_TAGS => (LIVE[tag].load(Relaxed), PEAK[tag].load(Relaxed)),
        _ => (0, 0),
    }
}

/// Starts a new peak for `tag` at its current live bytes.
pub fn reset_peak(tag: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    if (1..MAX_TAGS).contains(&tag) {
        PEAK[tag].store(LIVE[tag].load(Relaxed), Relaxed);
    }
}

/// Whether [`TaggedAllocator`] is this program's global allocator (its counters move).
pub fn tagged_allocator_installed() -> bool {
    let tag = MAX_TAGS - 1;
    let before = THREAD_TAG.with(|t| t.replace(tag));
    let (live, _) = tag_stats(tag);
    let probe = std::hint::black_box(vec![0u8; 64]);
    let moved = tag_stats(tag).0 != live;
    drop(probe);
    set_thread_tag(before);
    moved
}
