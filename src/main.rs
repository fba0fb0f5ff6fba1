// The engine allocates many small, short-lived strings per event (decode, outputs);
// mimalloc handles that pattern far better than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    augur::cli::main()
}
