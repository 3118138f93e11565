//! Code generation for a validated [`Service`]: the rewritten trait, the
//! `<Trait>Server<S>` dispatcher and the `<Trait>Client` proxy.
//!
//! Every path is absolute (`::core`, `::rpc`) so the expansion does not
//! depend on what the user imported, and the user's crate needs neither
//! `serde` nor `tokio` for the generated code itself.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, Index};

use crate::parse::{Method, Service};

/// Generates everything `#[service]` expands to.
pub(crate) fn expand(service: &Service) -> TokenStream {
    let names = Names::new(service);
    let service_trait = expand_trait(service);
    let server = expand_server(service, &names);
    let client = expand_client(service, &names);
    quote! {
        #service_trait
        #server
        #client
    }
}

/// Identifiers shared by the generated items.
struct Names {
    server: Ident,
    client: Ident,
}

impl Names {
    fn new(service: &Service) -> Self {
        // `format_ident!` drops a `r#` prefix, so `r#type` gives `typeServer`
        // rather than an invalid `r#typeServer`.
        let span = service.ident.span();
        Self {
            server: format_ident!("{}Server", service.ident, span = span),
            client: format_ident!("{}Client", service.ident, span = span),
        }
    }
}

/// `()` for methods without `->`.
fn output_type(method: &Method) -> TokenStream {
    match &method.output {
        Some(ty) => quote!(#ty),
        None => quote!(()),
    }
}

/// The trait with `async fn` turned into `fn -> impl Future + Send`: a
/// multi-threaded server spawns the futures, which plain `async fn` in a
/// trait cannot promise. Implementations may still write `async fn`.
fn expand_trait(service: &Service) -> TokenStream {
    let Service {
        attrs,
        vis,
        ident,
        supertraits,
        ..
    } = service;
    let supertraits = supertraits.iter();
    let methods = service.methods.iter().map(|m| {
        let attrs = &m.attrs;
        let name = &m.ident;
        let args = m.args.iter().map(|a| {
            let (ident, ty) = (&a.ident, &a.ty);
            quote!(#ident: #ty)
        });
        let output = output_type(m);
        quote_spanned! {m.span=>
            #(#attrs)*
            fn #name(&self #(, #args)*)
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send;
        }
    });
    quote! {
        #(#attrs)*
        #vis trait #ident: #(#supertraits +)* ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#methods)*
        }
    }
}

fn expand_server(service: &Service, names: &Names) -> TokenStream {
    let Service { vis, ident, .. } = service;
    let Names { server, client } = names;
    let server_name = server.to_string();

    // The dispatch impl names user types, so its type parameter must not
    // shadow one of them (a user type called `S` is plausible).
    let imp = Ident::new("__RpcImpl", Span::call_site());
    // Mixed-site locals cannot capture or shadow the user's argument names.
    let call = Ident::new("call", Span::mixed_site());
    let args = Ident::new("args", Span::mixed_site());
    let shared = Ident::new("service", Span::mixed_site());
    let replier = Ident::new("replier", Span::mixed_site());
    let output = Ident::new("output", Span::mixed_site());
    let future = Ident::new("future", Span::mixed_site());

    let arms = service.methods.iter().map(|m| {
        let wire = &m.wire_name;
        let name = &m.ident;
        let tys = m.args.iter().map(|a| &a.ty);
        let fields = (0..m.args.len()).map(Index::from);
        let encode_span = m.output.as_ref().map_or(m.span, Spanned::span);
        let encode = quote_spanned!(encode_span=> #replier.encode(&#output));
        // A missing `Deserialize` on an argument type is then reported at the
        // method's parameter list instead of at `async`.
        let decode = quote_spanned!(m.params_span=> #call.decode_args::<(#(#tys,)*)>());
        quote_spanned! {m.span=>
            #wire => {
                let #args = #decode?;
                let #shared = ::core::clone::Clone::clone(&self.inner);
                let #replier = #call.replier;
                let #future: ::rpc::__private::HandlerFuture =
                    ::rpc::__private::Box::pin(async move {
                        let #output = <#imp as #ident>::#name(&#shared #(, #args.#fields)*).await;
                        #encode
                    });
                ::core::result::Result::Ok(#future)
            }
        }
    });

    let doc = format!(
        "Server-side dispatch for [`{ident}`]: decodes each call's arguments, runs the \
         method on the wrapped implementation and encodes its return value.\n\n\
         Implements `rpc::transport::server::ServiceHandler`; hand it to a provider."
    );
    quote! {
        #[doc = #doc]
        #vis struct #server<S> {
            inner: ::rpc::__private::Arc<S>,
        }

        impl<S> ::core::clone::Clone for #server<S> {
            fn clone(&self) -> Self {
                Self { inner: ::core::clone::Clone::clone(&self.inner) }
            }
        }

        impl<S> ::core::fmt::Debug for #server<S> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(#server_name)
                    .field("service", &#client::SERVICE_NAME)
                    .field("version", &#client::SERVICE_VERSION)
                    .finish_non_exhaustive()
            }
        }

        impl<S: #ident> #server<S> {
            /// Wraps an implementation of the service.
            #vis fn new(service: S) -> Self {
                Self::from_arc(::rpc::__private::Arc::new(service))
            }

            /// Wraps an implementation that the caller keeps sharing.
            #vis fn from_arc(service: ::rpc::__private::Arc<S>) -> Self {
                Self { inner: service }
            }

            /// The wrapped implementation.
            #vis fn service(&self) -> &::rpc::__private::Arc<S> {
                &self.inner
            }
        }

        // Dispatch must keep serving methods the user marked deprecated.
        #[allow(deprecated)]
        impl<#imp: #ident> ::rpc::__private::ServiceHandler for #server<#imp> {
            fn service_name(&self) -> &str {
                #client::SERVICE_NAME
            }

            fn service_version(&self) -> &str {
                #client::SERVICE_VERSION
            }

            fn methods(&self) -> &'static [&'static str] {
                #client::METHODS
            }

            fn call(
                &self,
                #call: ::rpc::__private::Call<'_>,
            ) -> ::core::result::Result<
                ::rpc::__private::HandlerFuture,
                ::rpc::__private::CallError,
            > {
                match #call.method {
                    #(#arms)*
                    _ => ::core::result::Result::Err(#call.method_not_found(#client::SERVICE_NAME)),
                }
            }
        }
    }
}

fn expand_client(service: &Service, names: &Names) -> TokenStream {
    let Service {
        vis,
        ident,
        name,
        version,
        ..
    } = service;
    let Names { client, .. } = names;
    let wire_names = service.methods.iter().map(|m| &m.wire_name);

    let methods = service.methods.iter().map(|m| {
        let attrs = &m.client_attrs;
        let method = &m.ident;
        let wire = &m.wire_name;
        let params = m.args.iter().map(|a| {
            let (ident, ty) = (&a.ident, &a.ty);
            quote!(#ident: #ty)
        });
        let arg_names = m.args.iter().map(|a| &a.ident);
        let tys = m.args.iter().map(|a| &a.ty);
        let output = output_type(m);
        let idempotent = m.idempotent;
        let timeout = match m.timeout_ms {
            Some(ms) => {
                quote!(::core::option::Option::Some(::core::time::Duration::from_millis(#ms)))
            }
            None => quote!(::core::option::Option::None),
        };
        // A missing `Serialize` on an argument type (or `Deserialize` on the
        // output) is then reported at the method's parameter list.
        let call_fn = Ident::new("call_method", m.params_span);
        // A blank doc line keeps the generated paragraph out of the user's last one.
        let separator = attrs
            .iter()
            .any(|a| a.path().is_ident("doc"))
            .then(|| quote!(#[doc = ""]));
        let doc = format!(
            "Calls [`{ident}::{method}`] on a provider.\n\n\
             # Errors\n\n\
             An `rpc::RpcError` when the call does not complete: no provider, \
             transport failure, timeout, or a failure status from the server. \
             Errors the method itself returns are part of the `Ok` value."
        );
        quote_spanned! {m.span=>
            #(#attrs)*
            #separator
            #[doc = #doc]
            #vis async fn #method(&self #(, #params)*)
                -> ::core::result::Result<#output, ::rpc::RpcError>
            {
                const INFO: ::rpc::client::MethodInfo<'static> = ::rpc::client::MethodInfo {
                    name: #wire,
                    idempotent: #idempotent,
                    timeout: #timeout,
                };
                self.inner.#call_fn::<(#(#tys,)*), #output>(INFO, &(#(#arg_names,)*)).await
            }
        }
    });

    let doc = format!(
        "Client for [`{ident}`]: one method per service method, each returning the \
         method's output or an `rpc::RpcError`.\n\n\
         Cheap to clone; clones share the consumer's connections. `S` is the call \
         stack (`rpc::client` docs): the default for a plain `rpc::Consumer`, another \
         for a consumer with layers, or a stub in tests."
    );
    let name_doc = format!("Service name on the wire and in the registry: `{name}`.");
    let version_doc = format!("Service version: `{version}`.");
    let client_name = client.to_string();
    // Like `__RpcImpl`: must not shadow a user type called `S`.
    let stack = Ident::new("__RpcStack", Span::call_site());
    quote! {
        #[doc = #doc]
        #vis struct #client<#stack = ::rpc::client::DefaultStack> {
            inner: ::rpc::ServiceClient<#stack>,
        }

        impl<#stack> ::core::clone::Clone for #client<#stack> {
            fn clone(&self) -> Self {
                Self { inner: ::core::clone::Clone::clone(&self.inner) }
            }
        }

        impl<#stack> ::core::fmt::Debug for #client<#stack> {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(#client_name).field("inner", &self.inner).finish()
            }
        }

        impl #client {
            #[doc = #name_doc]
            #vis const SERVICE_NAME: &str = #name;

            #[doc = #version_doc]
            #vis const SERVICE_VERSION: &str = #version;

            /// Method names on the wire, in declaration order.
            #vis const METHODS: &[&str] = &[#(#wire_names),*];

            /// Builds a consumer from `config` and a client on it. Clients of
            /// several services should share one `rpc::Consumer` (and its
            /// connections) through [`new`](Self::new) instead.
            ///
            /// # Errors
            ///
            /// When the consumer cannot be built (e.g. the registry is unreachable).
            #vis async fn from_config(
                config: &::rpc::RpcConfig,
            ) -> ::core::result::Result<Self, ::rpc::RpcError> {
                let consumer = ::rpc::Consumer::from_config(config).await?;
                ::core::result::Result::Ok(Self::new(&consumer))
            }
        }

        impl<#stack: ::rpc::client::Call> #client<#stack> {
            /// A client that calls the service through `consumer` (and its layers).
            #vis fn new<C: ::rpc::client::MakeStack<Stack = #stack>>(consumer: &C) -> Self {
                Self {
                    inner: consumer.make_service(#name, #version),
                }
            }

            /// Wraps an untyped proxy, which should be for this service's name and version.
            #vis fn from_service_client(client: ::rpc::ServiceClient<#stack>) -> Self {
                Self { inner: client }
            }

            /// The untyped proxy underneath.
            #vis fn service_client(&self) -> &::rpc::ServiceClient<#stack> {
                &self.inner
            }

            /// This client with per-call options (timeout, metadata, hash
            /// key) for its calls; shares the connections, instance set,
            /// balancer and retry budget (`rpc::CallOptions`).
            #vis fn with(&self, options: ::rpc::CallOptions) -> Self {
                Self { inner: self.inner.with(options) }
            }

            #(#methods)*
        }
    }
}
