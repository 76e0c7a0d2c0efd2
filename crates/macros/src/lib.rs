//! Shoal's attribute macros. Use them through the `shoal` crate:
//! `#[shoal::remote]` and `#[shoal::main]`.
//!
//! Each macro is parse → IR → codegen ([`remote`] holds all three for
//! `#[remote]`), and reports misuse as a compile error pointing at the
//! offending tokens, never a panic. Expansions name everything by absolute
//! paths (`::shoal::...`).

mod actor;
mod remote;

use proc_macro::TokenStream;

/// Makes a free function callable as a task: `f::remote(args...)` returns an
/// `ObjectRef` of its result, and `f::options()` sets resources and retries.
///
/// Options: `num_cpus = N`, `num_gpus = N`, `max_retries = N`,
/// `retry_exceptions = bool`, `resources = { "disk" = 1.0 }`... see the
/// `shoal` crate's documentation.
///
/// The function must be a module-level item (not declared inside another
/// function's body): its companion module refers to it as `super::name`.
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    match remote::expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Makes a type an actor: put it on the struct and on its `impl` block.
/// The block needs a constructor `fn new(..) -> Self`; every method taking
/// `&self` or `&mut self` (sync or `async`) becomes callable through an
/// `ActorHandle`. `Type::remote(..)` creates one, `Type::options()` sets its
/// resources and concurrency.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    match actor::expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Puts an actor method in a concurrency group declared on its impl block:
/// `#[shoal::method(concurrency_group = "io")]`. Read by `#[shoal::actor]`;
/// anywhere else it is an error.
#[proc_macro_attribute]
pub fn method(attr: TokenStream, item: TokenStream) -> TokenStream {
    let _ = attr;
    let mut out: proc_macro2::TokenStream = syn::Error::new(
        proc_macro2::Span::call_site(),
        "#[shoal::method] goes on a method of an impl block marked #[shoal::actor] (above it)",
    )
    .to_compile_error();
    out.extend(proc_macro2::TokenStream::from(item));
    out.into()
}

/// Marks `main` of a program that uses Shoal: when the program is started as
/// a worker, it runs the worker loop instead of the body (so the body may
/// call `shoal::init` wherever it likes).
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    match remote::expand_main(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}
