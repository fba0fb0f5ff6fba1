fn main() -> std::process::ExitCode {
    augur::cli::main()
}
