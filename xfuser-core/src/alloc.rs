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
