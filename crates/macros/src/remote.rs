//! `#[remote]`: parse the function and its options into [`RemoteFn`], then
//! generate the companion module.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Expr, FnArg, Ident, ItemFn, Lit, Pat, ReturnType, Token, Type};

/// The options written in `#[remote(...)]`.
#[derive(Default)]
struct Options {
    num_cpus: Option<Expr>,
    num_gpus: Option<Expr>,
    max_retries: Option<Expr>,
    retry_exceptions: Option<Expr>,
    resources: Vec<(String, Expr)>,
    /// `num_returns = N`: the function returns an N-tuple, each element
    /// its own object.
    num_returns: Option<(u32, Span)>,
}

impl Parse for Options {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut options = Options::default();
        while !input.is_empty() {
            let key: Ident = input.parse()?;
            input.parse::<Token![=]>()?;
            match key.to_string().as_str() {
                "num_cpus" => options.num_cpus = Some(input.parse()?),
                "num_gpus" => options.num_gpus = Some(input.parse()?),
                "max_retries" => options.max_retries = Some(input.parse()?),
                "retry_exceptions" => options.retry_exceptions = Some(input.parse()?),
                "num_returns" => {
                    let n: syn::LitInt = input.parse()?;
                    let count: u32 = n.base10_parse()?;
                    if !(1..=64).contains(&count) {
                        return Err(syn::Error::new(n.span(), "num_returns is 1 to 64"));
                    }
                    options.num_returns = Some((count, n.span()));
                }
                "resources" => {
                    let content;
                    syn::braced!(content in input);
                    while !content.is_empty() {
                        let name: Lit = content.parse()?;
                        let Lit::Str(name) = name else {
                            return Err(syn::Error::new(name.span(), "resource names are string literals: { \"GPU\" = 1.0 }"));
                        };
                        content.parse::<Token![=]>()?;
                        let qty: Expr = content.parse()?;
                        options.resources.push((name.value(), qty));
                        if !content.is_empty() {
                            content.parse::<Token![,]>()?;
                        }
                    }
                }
                other => {
                    return Err(syn::Error::new(
                        key.span(),
                        format!("unknown option `{other}`; expected num_cpus, num_gpus, max_retries, retry_exceptions, resources or num_returns"),
                    ))
                }
            }
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(options)
    }
}

/// One parameter: its name and type.
struct Param {
    name: Ident,
    ty: Type,
}

/// What the return type means.
enum Returns {
    /// `-> T` (or nothing: `()`): the value itself.
    Value(Type),
    /// `-> Result<T, E>`: `Ok` is the value, `Err` fails the task.
    Fallible(Type),
}

/// A streaming generator's item type, and whether it is a `Stream`
/// (else an `Iterator`).
struct Streaming {
    item: Type,
    stream: bool,
}

/// The IR: everything codegen needs.
struct RemoteFn {
    item: ItemFn,
    name: Ident,
    is_async: bool,
    params: Vec<Param>,
    returns: Returns,
    options: Options,
    signature_hash: u64,
    streaming: Option<Streaming>,
}

/// `T` and the trait of a return type written `impl Iterator<Item = T>` or
/// `impl Stream<Item = T>` (any path ending so, with more bounds allowed).
fn streaming_item(ty: &Type) -> Option<Streaming> {
    let Type::ImplTrait(t) = ty else { return None };
    t.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last()?;
        let stream = match last.ident.to_string().as_str() {
            "Iterator" => false,
            "Stream" => true,
            _ => return None,
        };
        let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::AssocType(a) if a.ident == "Item" => Some(Streaming {
                item: a.ty.clone(),
                stream,
            }),
            _ => None,
        })
    })
}

fn parse(attr: TokenStream, item: TokenStream) -> syn::Result<RemoteFn> {
    let options: Options = syn::parse2(attr)?;
    let item: ItemFn = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            "#[shoal::remote] goes on a free `fn` (use #[shoal::actor] on types and their methods)",
        )
    })?;
    let sig = &item.sig;
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "#[shoal::remote] functions cannot be generic: a worker must know the concrete types to decode the arguments",
        ));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(syn::Error::new(
            unsafety.span(),
            "#[shoal::remote] functions cannot be unsafe",
        ));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(syn::Error::new(
            variadic.span(),
            "#[shoal::remote] functions cannot be variadic",
        ));
    }
    let mut params = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                return Err(syn::Error::new(
                    receiver.span(),
                    "#[shoal::remote] is for free functions; methods with `self` belong in an #[shoal::actor] impl",
                ))
            }
            FnArg::Typed(typed) => {
                let Pat::Ident(pat) = &*typed.pat else {
                    return Err(syn::Error::new(typed.pat.span(), "give this parameter a plain name: remote arguments are decoded by name"));
                };
                if let Type::Reference(r) = &*typed.ty {
                    return Err(syn::Error::new(
                        r.span(),
                        "remote arguments are sent by value: take an owned type (String, not &str; Vec<T>, not &[T])",
                    ));
                }
                if let Type::ImplTrait(t) = &*typed.ty {
                    return Err(syn::Error::new(t.span(), "remote arguments need a concrete type, not `impl Trait`"));
                }
                params.push(Param { name: pat.ident.clone(), ty: (*typed.ty).clone() });
            }
        }
    }
    let returns = match &sig.output {
        ReturnType::Default => Returns::Value(syn::parse_quote!(())),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => Returns::Fallible(ok),
            None => {
                if let Type::Reference(r) = &**ty {
                    return Err(syn::Error::new(
                        r.span(),
                        "a remote function returns an owned value, not a reference",
                    ));
                }
                Returns::Value((**ty).clone())
            }
        },
    };
    let streaming = match &sig.output {
        ReturnType::Type(_, ty) => streaming_item(ty),
        ReturnType::Default => None,
    };
    if let Some(s) = &streaming {
        if !s.stream && sig.asyncness.is_some() {
            return Err(syn::Error::new(
                sig.asyncness.span(),
                "an async generator returns `impl Stream<Item = T>`; `impl Iterator` is for plain `fn`s",
            ));
        }
        if options.num_returns.is_some_and(|(n, _)| n > 1) {
            return Err(syn::Error::new(
                sig.output.span(),
                "a streaming generator has no num_returns: each item is its own object",
            ));
        }
    }
    if let Some((n, span)) = options.num_returns.filter(|(n, _)| *n > 1) {
        let (Returns::Value(ty) | Returns::Fallible(ty)) = &returns;
        let elements = match ty {
            Type::Tuple(t) => t.elems.len(),
            _ => 0,
        };
        if elements != n as usize {
            return Err(syn::Error::new(
                span,
                format!("num_returns = {n} needs the function to return a tuple of {n} (or a Result of one): each element becomes its own object"),
            ));
        }
    }
    let signature_hash = fnv1a(sig.to_token_stream().to_string().as_bytes());
    Ok(RemoteFn {
        streaming,
        name: sig.ident.clone(),
        is_async: sig.asyncness.is_some(),
        params,
        returns,
        options,
        signature_hash,
        item,
    })
}

/// `T` of a return type written `Result<T, ..>` (any path ending in `Result`).
pub(crate) fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        syn::GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    }
}

/// FNV-1a: a stable hash for the signature, computed at compile time.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn codegen(f: RemoteFn) -> TokenStream {
    let RemoteFn {
        item,
        name,
        is_async,
        params,
        returns,
        options,
        signature_hash,
        streaming,
    } = f;
    let vis = &item.vis;
    let out_ty = match &returns {
        Returns::Value(t) | Returns::Fallible(t) => t.clone(),
    };
    let arg_names: Vec<&Ident> = params.iter().map(|p| &p.name).collect();
    let arg_types: Vec<&Type> = params.iter().map(|p| &p.ty).collect();
    let indices: Vec<usize> = (0..params.len()).collect();
    let call_args: Vec<Ident> = params
        .iter()
        .map(|p| format_ident!("__arg_{}", p.name))
        .collect();
    let call = if is_async {
        quote! { super::#name(#(#call_args),*).await }
    } else {
        quote! { super::#name(#(#call_args),*) }
    };
    let num_returns = options.num_returns.map_or(1, |(n, _)| n);
    // Each element of a tuple of returns is encoded on its own.
    let elements: Vec<Type> = match &out_ty {
        Type::Tuple(t) if num_returns > 1 => t.elems.iter().cloned().collect(),
        _ => Vec::new(),
    };
    let parts: Vec<Ident> = (0..elements.len())
        .map(|i| format_ident!("__r{}", i))
        .collect();
    let encode_value = if num_returns > 1 {
        quote! {{
            let (#(#parts),*) = v;
            ::core::result::Result::Ok(::shoal::__private::join_returns(&[
                #(::shoal::__private::encode_return(&#parts)?),*
            ]))
        }}
    } else {
        quote! { ::shoal::__private::encode_return(&v) }
    };
    let finish = match (&streaming, &returns) {
        (Some(Streaming { stream: false, .. }), _) => {
            quote! { ::shoal::__private::drive_iter(__out) }
        }
        (Some(Streaming { stream: true, .. }), _) => {
            quote! { ::shoal::__private::drive_stream(__out).await }
        }
        (None, Returns::Value(_)) => quote! {{ let v = __out; #encode_value }},
        (None, Returns::Fallible(_)) => quote! {
            match __out {
                ::core::result::Result::Ok(v) => #encode_value,
                ::core::result::Result::Err(e) => ::core::result::Result::Err(::shoal::__private::InvokeError::app(&e)),
            }
        },
    };
    let indices_out: Vec<u32> = (0..elements.len() as u32).collect();
    let (ref_ty, submit) = if let Some(Streaming { item, .. }) = &streaming {
        (
            quote! { ::shoal::ObjectRefGenerator<#item> },
            quote! {
                ::shoal::__private::submit_generator::<#item>(&FUNCTION, self.0, ::std::vec![#(::shoal::__private::arg::<#arg_types>(#arg_names.into())),*])
            },
        )
    } else if num_returns > 1 {
        (
            quote! { (#(::shoal::ObjectRef<#elements>),*) },
            quote! {
                let __first = ::shoal::__private::submit_returns(&FUNCTION, self.0, ::std::vec![#(::shoal::__private::arg::<#arg_types>(#arg_names.into())),*]);
                (#(::shoal::__private::return_ref::<#elements>(&__first, #indices_out)),*)
            },
        )
    } else {
        (
            quote! { ::shoal::ObjectRef<#out_ty> },
            quote! {
                ::shoal::__private::submit::<#out_ty>(&FUNCTION, self.0, ::std::vec![#(::shoal::__private::arg::<#arg_types>(#arg_names.into())),*])
            },
        )
    };
    let decode = quote! {
        let mut __args = __args.into_iter();
        #(
            let #call_args: #arg_types = ::shoal::__private::decode_arg(__args.next(), #indices, stringify!(#arg_names))?;
        )*
    };
    let is_streaming = streaming.is_some();
    // A `Stream` is driven on the runtime, whatever the function is.
    let invoker = if is_async || streaming.as_ref().is_some_and(|s| s.stream) {
        quote! {
            fn __invoke(__args: ::shoal::__private::Args) -> ::shoal::__private::BoxFuture<::core::result::Result<::std::vec::Vec<u8>, ::shoal::__private::InvokeError>> {
                ::std::boxed::Box::pin(async move {
                    #decode
                    let __out = #call;
                    #finish
                })
            }
            ::shoal::__private::Invoker::Async(__invoke)
        }
    } else {
        quote! {
            fn __invoke(__args: ::shoal::__private::Args) -> ::core::result::Result<::std::vec::Vec<u8>, ::shoal::__private::InvokeError> {
                #decode
                let __out = #call;
                #finish
            }
            ::shoal::__private::Invoker::Sync(__invoke)
        }
    };
    let mut defaults = quote! { ::shoal::TaskOptions::new() };
    if let Some(n) = &options.num_cpus {
        defaults = quote! { #defaults.num_cpus((#n) as f64) };
    }
    if let Some(n) = &options.num_gpus {
        defaults = quote! { #defaults.num_gpus((#n) as f64) };
    }
    if let Some(n) = &options.max_retries {
        defaults = quote! { #defaults.max_retries(#n) };
    }
    if let Some(b) = &options.retry_exceptions {
        defaults = quote! { #defaults.retry_exceptions(#b) };
    }
    for (res, qty) in &options.resources {
        defaults = quote! { #defaults.resource(#res, (#qty) as f64) };
    }
    let doc = format!("Run [`{name}`](fn@{name}) as a task: see `shoal::remote`.");
    let options_ty = Ident::new("Options", Span::call_site());
    quote! {
        #item

        #[doc = #doc]
        #[allow(non_snake_case, non_camel_case_types, dead_code, clippy::all)]
        #vis mod #name {
            #[allow(unused_imports)]
            use super::*;

            /// The function's registered name.
            pub const NAME: &str = ::core::module_path!();

            /// Submits a task; each argument is a value or an `ObjectRef` of one.
            pub fn remote(#(#arg_names: impl ::core::convert::Into<::shoal::Arg<#arg_types>>),*) -> #ref_ty {
                options().remote(#(#arg_names),*)
            }

            /// Options for one submission: resources, retries.
            pub fn options() -> #options_ty {
                #options_ty(#defaults)
            }

            /// Per-submission options; finish with `.remote(...)`.
            pub struct #options_ty(pub ::shoal::TaskOptions);

            impl #options_ty {
                /// CPUs the task holds while it runs (default 1).
                pub fn num_cpus(self, n: f64) -> Self { Self(self.0.num_cpus(n)) }
                /// Retries if the worker or node dies (default 3).
                pub fn max_retries(self, n: u32) -> Self { Self(self.0.max_retries(n)) }
                /// Also retry when the function returns `Err` or panics.
                pub fn retry_exceptions(self, yes: bool) -> Self { Self(self.0.retry_exceptions(yes)) }
                /// A custom resource the task holds while it runs.
                pub fn resource(self, name: &str, quantity: f64) -> Self { Self(self.0.resource(name, quantity)) }
                /// GPUs held (a fraction below one shares a device).
                pub fn num_gpus(self, n: f64) -> Self { Self(self.0.num_gpus(n)) }
                /// Only nodes whose labels match: `&[("zone", "a")]`, `"!a"`, `"in(a,b)"`, `"!in(a,b)"`.
                pub fn label_selector(self, pairs: &[(&str, &str)]) -> Self { Self(self.0.label_selector(pairs)) }
                /// Nodes whose labels match are preferred.
                pub fn label_selector_soft(self, pairs: &[(&str, &str)]) -> Self { Self(self.0.label_selector_soft(pairs)) }
                /// How a node is picked: `shoal::Strategy::Spread`, `shoal::Strategy::node_affinity(id, soft)`.
                pub fn scheduling(self, strategy: ::shoal::Strategy) -> Self { Self(self.0.scheduling(strategy)) }
                /// Cancel the task past this long after its submission: its reference gives `Error::Timeout`.
                pub fn timeout(self, after: ::std::time::Duration) -> Self { Self(self.0.timeout(after)) }
                /// A variable set in the environment of the worker process that runs the task.
                pub fn env_var(self, name: &str, value: &str) -> Self { Self(self.0.env_var(name, value)) }
                /// For a streaming generator: items the producer may be ahead of the caller (default 16).
                pub fn generator_backpressure(self, items: u32) -> Self { Self(self.0.generator_backpressure(items)) }
                /// Submits the task with these options.
                pub fn remote(self, #(#arg_names: impl ::core::convert::Into<::shoal::Arg<#arg_types>>),*) -> #ref_ty {
                    #submit
                }
            }

            /// The registry entry workers look the function up by.
            pub static FUNCTION: ::shoal::__private::RemoteFunction = ::shoal::__private::RemoteFunction {
                name: NAME,
                signature: #signature_hash,
                invoke: { #invoker },
                returns: #num_returns,
                streaming: #is_streaming,
            };

            ::shoal::__private::inventory::submit! { ::shoal::__private::Registered(&FUNCTION) }
        }
    }
}

/// `#[remote]`.
pub fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    Ok(codegen(parse(attr, item)?))
}

/// `#[main]`: run the worker loop first when started as a worker.
pub fn expand_main(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    if !attr.is_empty() {
        return Err(syn::Error::new(
            attr.span(),
            "#[shoal::main] takes no options",
        ));
    }
    let mut item: ItemFn = syn::parse2(item)?;
    if item.sig.ident != "main" {
        return Err(syn::Error::new(
            item.sig.ident.span(),
            "#[shoal::main] goes on `fn main`",
        ));
    }
    if item.sig.asyncness.is_some() {
        return Err(syn::Error::new(
            item.sig.asyncness.span(),
            "#[shoal::main] wants a plain `fn main`; use `shoal::block_on` or your own runtime inside it",
        ));
    }
    let body = &item.block;
    item.block = syn::parse_quote!({
        ::shoal::__private::run_worker_if_worker();
        #body
    });
    Ok(item.into_token_stream())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(attr: TokenStream, item: TokenStream) -> String {
        match expand(attr, item) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn misuse_gets_actionable_errors() {
        assert!(err(
            quote!(),
            quote!(
                fn f<T>(x: T) -> T {
                    x
                }
            )
        )
        .contains("generic"));
        assert!(err(
            quote!(),
            quote!(
                fn f(x: &str) {}
            )
        )
        .contains("by value"));
        assert!(err(
            quote!(),
            quote!(
                fn f((a, b): (i32, i32)) {}
            )
        )
        .contains("plain name"));
        assert!(err(
            quote!(bogus = 1),
            quote!(
                fn f() {}
            )
        )
        .contains("unknown option"));
        assert!(err(
            quote!(),
            quote!(
                struct S;
            )
        )
        .contains("free `fn`"));
        assert!(err(
            quote!(),
            quote!(
                fn f(x: impl Clone) {}
            )
        )
        .contains("concrete type"));
        assert!(err(
            quote!(num_returns = 2),
            quote!(
                fn f() -> u32 {
                    1
                }
            )
        )
        .contains("tuple of 2"));
        assert!(err(
            quote!(num_returns = 3),
            quote!(
                fn f() -> Result<(u8, u8), String> {
                    Ok((1, 2))
                }
            )
        )
        .contains("tuple of 3"));
        assert!(err(
            quote!(num_returns = 0),
            quote!(
                fn f() {}
            )
        )
        .contains("1 to 64"));
        assert!(expand(
            quote!(num_returns = 2),
            quote!(
                fn f() -> Result<(u8, String), String> {
                    Ok((1, String::new()))
                }
            )
        )
        .is_ok());
    }

    #[test]
    fn generators_are_recognised() {
        let ty: Type = syn::parse_quote!(impl Iterator<Item = (u32, String)> + Send);
        let s = streaming_item(&ty).expect("an iterator");
        assert!(!s.stream);
        let ty: Type = syn::parse_quote!(impl shoal::Stream<Item = u8>);
        assert!(streaming_item(&ty).expect("a stream").stream);
        let ty: Type = syn::parse_quote!(impl Clone);
        assert!(streaming_item(&ty).is_none());
        assert!(err(
            quote!(),
            quote!(
                async fn f() -> impl Iterator<Item = u8> {
                    0..1
                }
            )
        )
        .contains("impl Stream"));
        assert!(err(
            quote!(num_returns = 2),
            quote!(
                fn f() -> impl Iterator<Item = u8> {
                    0..1
                }
            )
        )
        .contains("no num_returns"));
    }

    #[test]
    fn result_types_are_recognised() {
        let ty: Type = syn::parse_quote!(std::result::Result<Vec<u8>, MyError>);
        assert!(result_ok_type(&ty).is_some());
        let ty: Type = syn::parse_quote!(Vec<u8>);
        assert!(result_ok_type(&ty).is_none());
    }

    #[test]
    fn the_signature_hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(b"fn a(x: i64)"), fnv1a(b"fn a(x: i32)"));
    }
}
