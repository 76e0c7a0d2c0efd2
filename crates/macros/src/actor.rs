//! `#[actor]`: on the type, a check that it can be an actor; on its `impl`
//! block, parse the constructor and methods into [`ActorImpl`], then
//! generate the registry entry, the typed handle methods and `remote`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, ToTokens};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ImplItem, ImplItemFn, Item, ItemImpl, Pat, ReturnType, Type};

use crate::remote::result_ok_type;

struct Param {
    name: Ident,
    ty: Type,
}

#[derive(Clone, Copy)]
enum Receiver {
    Ref,
    Mut,
}

struct Method {
    name: Ident,
    /// `#[shoal::method(concurrency_group = "io")]`: its group's index.
    group: Option<usize>,
    receiver: Receiver,
    is_async: bool,
    params: Vec<Param>,
    output: Type,
    fallible: bool,
    vis: syn::Visibility,
}

/// The IR of an actor's `impl` block.
struct ActorImpl {
    item: ItemImpl,
    ty: Ident,
    ctor: Vec<Param>,
    methods: Vec<Method>,
    /// `concurrency_groups(io = 4, compute = 1)`: names and sizes.
    groups: Vec<(String, syn::Expr)>,
}

/// `concurrency_groups(name = n, ...)`, the options of `#[shoal::actor]`
/// on an `impl` block.
fn parse_groups(attr: TokenStream) -> syn::Result<Vec<(String, syn::Expr)>> {
    if attr.is_empty() {
        return Ok(Vec::new());
    }
    let unknown = |span| {
        syn::Error::new(
            span,
            "#[shoal::actor] on an impl block takes `concurrency_groups(name = n, ...)`; set other options with `Type::options()`",
        )
    };
    let parser = |input: syn::parse::ParseStream<'_>| -> syn::Result<Vec<(String, syn::Expr)>> {
        let key: Ident = input.parse()?;
        if key != "concurrency_groups" {
            return Err(unknown(key.span()));
        }
        let content;
        syn::parenthesized!(content in input);
        let mut groups: Vec<(String, syn::Expr)> = Vec::new();
        while !content.is_empty() {
            let name: Ident = content.parse()?;
            content.parse::<syn::Token![=]>()?;
            let size: syn::Expr = content.parse()?;
            if groups.iter().any(|(n, _)| name == n) {
                return Err(syn::Error::new(
                    name.span(),
                    "this concurrency group is named twice",
                ));
            }
            groups.push((name.to_string(), size));
            if !content.is_empty() {
                content.parse::<syn::Token![,]>()?;
            }
        }
        if !input.is_empty() {
            return Err(unknown(input.span()));
        }
        Ok(groups)
    };
    syn::parse::Parser::parse2(parser, attr)
}

/// Takes `#[shoal::method(concurrency_group = "name")]` off a method and
/// returns the group's name.
fn take_method_options(f: &mut ImplItemFn) -> syn::Result<Option<(String, Span)>> {
    let mut group = None;
    let mut error = None;
    f.attrs.retain(|attr| {
        let is_method = attr
            .path()
            .segments
            .last()
            .is_some_and(|s| s.ident == "method")
            && attr.path().segments.len() <= 2;
        if !is_method {
            return true;
        }
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("concurrency_group") {
                let name: syn::LitStr = meta.value()?.parse()?;
                group = Some((name.value(), name.span()));
                Ok(())
            } else {
                Err(meta.error("#[shoal::method] takes `concurrency_group = \"name\"`"))
            }
        });
        if let Err(e) = parsed {
            error = Some(e);
        }
        false
    });
    match error {
        Some(e) => Err(e),
        None => Ok(group),
    }
}

fn params<'a>(inputs: impl Iterator<Item = &'a FnArg>) -> syn::Result<Vec<Param>> {
    let mut out = Vec::new();
    for input in inputs {
        let FnArg::Typed(typed) = input else { continue };
        let Pat::Ident(pat) = &*typed.pat else {
            return Err(syn::Error::new(
                typed.pat.span(),
                "give this parameter a plain name: arguments are decoded by name",
            ));
        };
        if let Type::Reference(r) = &*typed.ty {
            return Err(syn::Error::new(
                r.span(),
                "actor method arguments are sent by value: take an owned type",
            ));
        }
        out.push(Param {
            name: pat.ident.clone(),
            ty: (*typed.ty).clone(),
        });
    }
    Ok(out)
}

fn parse(mut item: ItemImpl, groups: Vec<(String, syn::Expr)>) -> syn::Result<ActorImpl> {
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "actor types cannot be generic",
        ));
    }
    if let Some((_, path, _)) = &item.trait_ {
        return Err(syn::Error::new(
            path.span(),
            "#[shoal::actor] goes on the type's own `impl` block, not a trait impl",
        ));
    }
    let Type::Path(path) = &*item.self_ty else {
        return Err(syn::Error::new(
            item.self_ty.span(),
            "#[shoal::actor] needs a named type",
        ));
    };
    let ty = path
        .path
        .segments
        .last()
        .map(|s| s.ident.clone())
        .ok_or_else(|| syn::Error::new(path.span(), "empty type path"))?;
    let mut ctor = None;
    let mut methods = Vec::new();
    for impl_item in &mut item.items {
        let ImplItem::Fn(f) = impl_item else { continue };
        let group = match take_method_options(f)? {
            Some((name, span)) => match groups.iter().position(|(g, _)| *g == name) {
                Some(index) => Some(index),
                None => {
                    return Err(syn::Error::new(
                        span,
                        format!("no concurrency group {name:?}: declare it in #[shoal::actor(concurrency_groups({name} = n))] on this impl block"),
                    ))
                }
            },
            None => None,
        };
        match f.sig.inputs.first() {
            Some(FnArg::Receiver(receiver)) => {
                let mut m = method(f, receiver)?;
                m.group = group;
                methods.push(m);
            }
            _ if group.is_some() => {
                return Err(syn::Error::new(
                    f.sig.span(),
                    "only methods taking `&self` or `&mut self` belong to a concurrency group",
                ))
            }
            _ if f.sig.ident == "new" => {
                if f.sig.asyncness.is_some() {
                    return Err(syn::Error::new(
                        f.sig.span(),
                        "the actor constructor `new` cannot be async",
                    ));
                }
                ctor = Some(params(f.sig.inputs.iter())?);
            }
            _ => {}
        }
    }
    let ctor = ctor.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            format!(
                "an actor needs a constructor `pub fn new(..) -> Self` in this impl block of {ty}"
            ),
        )
    })?;
    Ok(ActorImpl {
        item,
        ty,
        ctor,
        methods,
        groups,
    })
}

fn method(f: &ImplItemFn, receiver: &syn::Receiver) -> syn::Result<Method> {
    if receiver.reference.is_none() {
        return Err(syn::Error::new(
            receiver.span(),
            "actor methods take `&self` or `&mut self`, not `self`",
        ));
    }
    if !f.sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            f.sig.generics.span(),
            "actor methods cannot be generic",
        ));
    }
    let (output, fallible) = match &f.sig.output {
        ReturnType::Default => (syn::parse_quote!(()), false),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => (ok, true),
            None => ((**ty).clone(), false),
        },
    };
    Ok(Method {
        name: f.sig.ident.clone(),
        group: None,
        receiver: if receiver.mutability.is_some() {
            Receiver::Mut
        } else {
            Receiver::Ref
        },
        is_async: f.sig.asyncness.is_some(),
        params: params(f.sig.inputs.iter().skip(1))?,
        output,
        fallible,
        vis: f.vis.clone(),
    })
}

fn decode(params: &[Param]) -> (TokenStream, Vec<Ident>) {
    let vars: Vec<Ident> = params
        .iter()
        .map(|p| format_ident!("__arg_{}", p.name))
        .collect();
    let types = params.iter().map(|p| &p.ty);
    let names = params.iter().map(|p| &p.name);
    let indices = 0..params.len();
    let tokens = quote! {
        let mut __args = __args.into_iter();
        #( let #vars: #types = ::shoal::__private::decode_arg(__args.next(), #indices, stringify!(#names))?; )*
    };
    (tokens, vars)
}

fn codegen(a: ActorImpl) -> TokenStream {
    let ActorImpl {
        item,
        ty,
        ctor,
        methods,
        groups,
    } = a;
    let group_names: Vec<&String> = groups.iter().map(|(n, _)| n).collect();
    let group_sizes: Vec<&syn::Expr> = groups.iter().map(|(_, s)| s).collect();
    let method_groups: Vec<TokenStream> = methods
        .iter()
        .map(|m| match m.group {
            Some(i) => quote! { ::core::option::Option::Some(#i) },
            None => quote! { ::core::option::Option::None },
        })
        .collect();
    let methods_ty = format_ident!("{}Methods", ty);
    let options_ty = format_ident!("{}Options", ty);
    let (ctor_decode, ctor_vars) = decode(&ctor);
    let ctor_names: Vec<&Ident> = ctor.iter().map(|p| &p.name).collect();
    let ctor_types: Vec<&Type> = ctor.iter().map(|p| &p.ty).collect();
    let mut invokers = Vec::new();
    let mut entries = Vec::new();
    let mut proxies = Vec::new();
    for m in &methods {
        let name = &m.name;
        let invoke = format_ident!("__invoke_{}", name);
        let (decode, vars) = decode(&m.params);
        let call = if m.is_async {
            quote! { this.#name(#(#vars),*).await }
        } else {
            quote! { this.#name(#(#vars),*) }
        };
        let finish = if m.fallible {
            quote! {
                match __out {
                    ::core::result::Result::Ok(v) => ::shoal::__private::encode_return(&v),
                    ::core::result::Result::Err(e) => ::core::result::Result::Err(::shoal::__private::InvokeError::app(&e)),
                }
            }
        } else {
            quote! { ::shoal::__private::encode_return(&__out) }
        };
        let wrong = quote! { ::shoal::__private::InvokeError::wrong_actor(::core::any::type_name::<#ty>()) };
        let (func, variant) = match (m.receiver, m.is_async) {
            (Receiver::Ref, false) => (
                quote! {
                    fn #invoke(__state: &::shoal::__private::ActorState, __args: ::shoal::__private::Args) -> ::shoal::registry::Invocation {
                        let this = __state.downcast_ref::<#ty>().ok_or_else(|| #wrong)?;
                        #decode
                        let __out = #call;
                        #finish
                    }
                },
                quote! { Ref },
            ),
            (Receiver::Mut, false) => (
                quote! {
                    fn #invoke(__state: &mut ::shoal::__private::ActorState, __args: ::shoal::__private::Args) -> ::shoal::registry::Invocation {
                        let this = __state.downcast_mut::<#ty>().ok_or_else(|| #wrong)?;
                        #decode
                        let __out = #call;
                        #finish
                    }
                },
                quote! { Mut },
            ),
            (Receiver::Ref, true) => (
                quote! {
                    fn #invoke(__guard: ::shoal::__private::ReadGuard, __args: ::shoal::__private::Args) -> ::shoal::__private::BoxFuture<::shoal::registry::Invocation> {
                        ::std::boxed::Box::pin(async move {
                            let this = __guard.downcast_ref::<#ty>().ok_or_else(|| #wrong)?;
                            #decode
                            let __out = #call;
                            #finish
                        })
                    }
                },
                quote! { AsyncRef },
            ),
            (Receiver::Mut, true) => (
                quote! {
                    fn #invoke(mut __guard: ::shoal::__private::WriteGuard, __args: ::shoal::__private::Args) -> ::shoal::__private::BoxFuture<::shoal::registry::Invocation> {
                        ::std::boxed::Box::pin(async move {
                            let this = __guard.downcast_mut::<#ty>().ok_or_else(|| #wrong)?;
                            #decode
                            let __out = #call;
                            #finish
                        })
                    }
                },
                quote! { AsyncMut },
            ),
        };
        invokers.push(func);
        let name_str = name.to_string();
        entries.push(quote! { (#name_str, ::shoal::__private::MethodInvoker::#variant(#invoke)) });
        let pnames: Vec<&Ident> = m.params.iter().map(|p| &p.name).collect();
        let ptypes: Vec<&Type> = m.params.iter().map(|p| &p.ty).collect();
        let out = &m.output;
        let vis = &m.vis;
        let doc =
            format!("Calls `{ty}::{name}` on the actor; the reference resolves to its result.");
        proxies.push(quote! {
            #[doc = #doc]
            #vis fn #name(&self, #(#pnames: impl ::core::convert::Into<::shoal::Arg<#ptypes>>),*) -> ::shoal::ObjectRef<#out> {
                ::shoal::__private::call_actor(&self.0, #name_str, ::std::vec![#(::shoal::__private::arg::<#ptypes>(#pnames.into())),*])
            }
        });
    }
    let handle_doc = format!(
        "The methods of an `ActorHandle<{ty}>`: each call returns an `ObjectRef` of the result."
    );
    quote! {
        #item

        #[doc = #handle_doc]
        #[derive(Clone)]
        pub struct #methods_ty(::shoal::__private::RawActor);

        impl ::core::convert::From<::shoal::__private::RawActor> for #methods_ty {
            fn from(raw: ::shoal::__private::RawActor) -> Self { Self(raw) }
        }

        impl ::core::convert::AsRef<::shoal::__private::RawActor> for #methods_ty {
            fn as_ref(&self) -> &::shoal::__private::RawActor { &self.0 }
        }

        #[allow(clippy::all)]
        impl #methods_ty {
            #(#proxies)*
        }

        /// Options for creating the actor; finish with `.remote(...)`.
        pub struct #options_ty(pub ::shoal::ActorOptions);

        impl #options_ty {
            /// CPUs the actor holds while it lives (default 0).
            pub fn num_cpus(self, n: f64) -> Self { Self(self.0.num_cpus(n)) }
            /// A custom resource the actor holds while it lives.
            pub fn resource(self, name: &str, quantity: f64) -> Self { Self(self.0.resource(name, quantity)) }
            /// GPUs held (a fraction below one shares a device).
            pub fn num_gpus(self, n: f64) -> Self { Self(self.0.num_gpus(n)) }
            /// Only nodes whose labels match: `&[("zone", "a")]`, `"!a"`, `"in(a,b)"`, `"!in(a,b)"`.
            pub fn label_selector(self, pairs: &[(&str, &str)]) -> Self { Self(self.0.label_selector(pairs)) }
            /// Nodes whose labels match are preferred.
            pub fn label_selector_soft(self, pairs: &[(&str, &str)]) -> Self { Self(self.0.label_selector_soft(pairs)) }
            /// How a node is picked: `shoal::Strategy::Spread`, `shoal::Strategy::node_affinity(id, soft)`.
            pub fn scheduling(self, strategy: ::shoal::Strategy) -> Self { Self(self.0.scheduling(strategy)) }
            /// Calls that may run at once (`&self` and `async` methods).
            pub fn max_concurrency(self, n: u32) -> Self { Self(self.0.max_concurrency(n)) }
            /// Calls a handle may have unanswered; more fail at once.
            pub fn max_pending_calls(self, n: u32) -> Self { Self(self.0.max_pending_calls(n)) }
            /// A name, unique in its namespace, for `shoal::get_actor`.
            pub fn name(self, name: &str) -> Self { Self(self.0.name(name)) }
            /// The namespace of the name.
            pub fn namespace(self, namespace: &str) -> Self { Self(self.0.namespace(namespace)) }
            /// The actor outlives its creator's job, until killed.
            pub fn lifetime_detached(self) -> Self { Self(self.0.lifetime_detached()) }
            /// Restarts (the constructor run again) after its worker or node dies (default 0).
            pub fn max_restarts(self, n: u32) -> Self { Self(self.0.max_restarts(n)) }
            /// Resends of a call in flight when the worker died (default 0).
            pub fn max_task_retries(self, n: u32) -> Self { Self(self.0.max_task_retries(n)) }
            /// A variable set in the actor's worker process environment.
            pub fn env_var(self, name: &str, value: &str) -> Self { Self(self.0.env_var(name, value)) }
            /// Creates the actor with these options.
            pub fn remote(self, #(#ctor_names: impl ::core::convert::Into<::shoal::Arg<#ctor_types>>),*) -> ::shoal::Result<::shoal::ActorHandle<#ty>> {
                ::shoal::__private::create_actor::<#ty>(self.0, ::std::vec![#(::shoal::__private::arg::<#ctor_types>(#ctor_names.into())),*])
            }
        }

        impl #ty {
            /// Creates the actor in a worker of its own and returns its handle.
            pub fn remote(#(#ctor_names: impl ::core::convert::Into<::shoal::Arg<#ctor_types>>),*) -> ::shoal::Result<::shoal::ActorHandle<#ty>> {
                Self::options().remote(#(#ctor_names),*)
            }

            /// Options for creating the actor.
            pub fn options() -> #options_ty {
                #options_ty(::shoal::ActorOptions::new())
            }
        }

        impl ::shoal::Actor for #ty {
            type Methods = #methods_ty;
            const CLASS: &'static str = ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ty));
        }

        #[allow(non_snake_case, clippy::all)]
        const _: () = {
            fn __construct(__args: ::shoal::__private::Args) -> ::core::result::Result<::shoal::__private::ActorState, ::shoal::__private::InvokeError> {
                #ctor_decode
                ::core::result::Result::Ok(::std::boxed::Box::new(<#ty>::new(#(#ctor_vars),*)))
            }
            #(#invokers)*
            static CLASS: ::shoal::__private::ActorClass = ::shoal::__private::ActorClass {
                name: <#ty as ::shoal::Actor>::CLASS,
                construct: __construct,
                methods: &[#(#entries),*],
                concurrency_groups: &[#((#group_names, (#group_sizes) as u32)),*],
                method_groups: &[#(#method_groups),*],
            };
            ::shoal::__private::inventory::submit! { ::shoal::__private::RegisteredActor(&CLASS) }
        };
    }
}

/// `#[actor]` on a type or on its `impl` block.
pub fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    match syn::parse2::<Item>(item)? {
        Item::Impl(item) => Ok(codegen(parse(item, parse_groups(attr)?)?)),
        _ if !attr.is_empty() => Err(syn::Error::new(
            attr.span(),
            "#[shoal::actor] on a type takes no options; concurrency groups go on the impl block, other options in `Type::options()`",
        )),
        Item::Struct(s) => {
            let ty = &s.ident;
            if !s.generics.params.is_empty() {
                return Err(syn::Error::new(
                    s.generics.span(),
                    "actor types cannot be generic",
                ));
            }
            // Methods may run on several threads at once: the state must be
            // Send + Sync, checked here with a clear message.
            Ok(quote! {
                #s
                const _: fn() = || {
                    fn actor_state_must_be_send_sync_and_static<T: ::core::marker::Send + ::core::marker::Sync + 'static>() {}
                    actor_state_must_be_send_sync_and_static::<#ty>();
                };
            })
        }
        Item::Enum(e) => Ok(e.into_token_stream()),
        other => Err(syn::Error::new(
            other.span(),
            "#[shoal::actor] goes on a struct and on its `impl` block",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(item: TokenStream) -> String {
        match expand(TokenStream::new(), item) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn misuse_gets_actionable_errors() {
        assert!(err(quote!(impl C { fn read(&self) -> u8 { 0 } })).contains("constructor"));
        assert!(err(quote!(impl C { fn new() -> Self { C } fn eat(self) {} })).contains("&self"));
        assert!(err(quote!(
            impl<T> C<T> {
                fn new(t: T) -> Self {
                    C(t)
                }
            }
        ))
        .contains("generic"));
        assert!(
            err(quote!(impl C { fn new() -> Self { C } fn m(&self, s: &str) {} }))
                .contains("by value")
        );
        assert!(err(quote!(
            fn f() {}
        ))
        .contains("struct"));
    }

    #[test]
    fn concurrency_groups_are_declared_then_used() {
        let expand_err = |attr: TokenStream, item: TokenStream| match expand(attr, item) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        let unknown = expand_err(
            quote!(concurrency_groups(io = 2)),
            quote!(impl C {
                fn new() -> Self { C }
                #[shoal::method(concurrency_group = "disk")]
                fn read(&self) {}
            }),
        );
        assert!(
            unknown.contains("no concurrency group \"disk\""),
            "{unknown}"
        );
        assert!(expand_err(
            quote!(groups(io = 2)),
            quote!(impl C { fn new() -> Self { C } })
        )
        .contains("concurrency_groups"));
        assert!(expand_err(
            quote!(concurrency_groups(io = 2)),
            quote!(
                struct C;
            )
        )
        .contains("impl block"));
        assert!(expand_err(
            quote!(concurrency_groups(io = 2, io = 3)),
            quote!(impl C { fn new() -> Self { C } })
        )
        .contains("twice"));
        let item: ItemImpl = syn::parse_quote! {
            impl C {
                fn new() -> Self { C }
                #[shoal::method(concurrency_group = "io")]
                async fn fetch(&self) {}
                fn plain(&self) {}
            }
        };
        let groups = parse_groups(quote!(concurrency_groups(compute = 1, io = 4))).expect("groups");
        let a = parse(item, groups).expect("parses");
        assert_eq!(a.methods[0].group, Some(1));
        assert_eq!(a.methods[1].group, None);
        let stripped = a.item.to_token_stream().to_string();
        assert!(
            !stripped.contains("method"),
            "the marker is taken off: {stripped}"
        );
    }

    #[test]
    fn methods_are_classified() {
        let item: ItemImpl = syn::parse_quote! {
            impl C {
                pub fn new(start: u64) -> Self { C }
                pub fn incr(&mut self, by: u64) -> u64 { by }
                pub fn read(&self) -> u64 { 0 }
                pub async fn slow(&self, ms: u64) -> Result<u64, String> { Ok(ms) }
                fn helper() {}
            }
        };
        let a = parse(item, Vec::new()).expect("parses");
        assert_eq!(a.ctor.len(), 1);
        assert_eq!(a.methods.len(), 3);
        assert!(matches!(a.methods[0].receiver, Receiver::Mut));
        assert!(a.methods[2].is_async && a.methods[2].fallible);
    }
}
