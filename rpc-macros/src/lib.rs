//! The `#[service]` attribute macro of the `rpc` framework. Use it through
//! the facade, as `#[rpc::service]`: the generated code names `::rpc`.
//!
//! ```ignore
//! // Compiled for real by rpc/tests/service_macro.rs; rpc-macros cannot
//! // depend on the `rpc` facade its expansion refers to.
//! use rpc::serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! #[serde(crate = "rpc::serde")]
//! pub struct User {
//!     pub id: u64,
//!     pub name: String,
//! }
//!
//! /// Users, by id.
//! #[rpc::service(version = "1.0")]
//! pub trait UserService {
//!     /// The user with this id.
//!     async fn get_user(&self, id: u64) -> Option<User>;
//!     async fn ping(&self);
//! }
//!
//! struct Users;
//!
//! impl UserService for Users {
//!     async fn get_user(&self, id: u64) -> Option<User> {
//!         Some(User { id, name: "ada".into() })
//!     }
//!     async fn ping(&self) {}
//! }
//!
//! // Provider side: a `rpc::transport::server::ServiceHandler`.
//! let server = UserServiceServer::new(Users);
//!
//! // Consumer side: `Result<Option<User>, rpc::RpcError>`.
//! # async fn consumer(consumer: &rpc::Consumer) -> Result<(), rpc::RpcError> {
//! let client = UserServiceClient::new(consumer);
//! let user = client.get_user(7).await?;
//! # Ok(()) }
//! ```
//!
//! For `pub trait UserService` the macro emits, with the trait's visibility:
//!
//! * `trait UserService: Send + Sync + 'static`, each `async fn` rewritten
//!   as `fn .. -> impl Future<Output = T> + Send` so a multi-threaded server
//!   can spawn the calls. Implementations still write `async fn`.
//! * `UserServiceServer<S>` — `new(S)`, `from_arc(Arc<S>)`, `service()`, and
//!   the `ServiceHandler` implementation: decode the argument tuple, call
//!   the method, encode the return value.
//! * `UserServiceClient` — `SERVICE_NAME`, `SERVICE_VERSION`, `METHODS`,
//!   `new(&Consumer)`, `from_config(&RpcConfig)`, `from_service_client`,
//!   `service_client()`, and one `async fn` per method returning
//!   `Result<T, RpcError>`.
//!
//! Attribute arguments: `name = "..."` (default: the trait's name) and
//! `version = "..."` (default: `"1.0"`). On the wire, arguments are always a
//! tuple (`()`, `(id,)`, `(a, b, c)`) and a method is named by its Rust name.
//! A method returning `Result<T, E>` sends the whole `Result`: its errors
//! reach the client as `Ok(Err(e))`, not as RPC failures.
//!
//! Signatures the generated code cannot serve are compile errors at the
//! offending token: non-`async` methods, receivers other than `&self`,
//! generics, argument patterns, borrowed or `impl Trait` types, default
//! bodies, and trait items other than methods.
//!
//! # Layout
//!
//! * `lib.rs` — the entry point and its error handling.
//! * `parse.rs` — attribute arguments, trait parsing and every validation
//!   rule, producing a `Service` that needs no further checks.
//! * `expand.rs` — code generation: trait, server, client.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod expand;
mod parse;

use proc_macro::TokenStream;

/// Turns a trait into an RPC service: see the [crate documentation](crate).
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    service_impl(attr.into(), item.into()).into()
}

/// The macro on `proc_macro2` tokens, so it can be unit tested.
///
/// On invalid input only the errors are emitted: re-emitting the trait
/// would add rustc's own errors for the same signatures (patterns in
/// bodiless methods, for one) on top of ours.
fn service_impl(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    match parse::parse(attr, item) {
        Ok(service) => expand::expand(&service),
        Err(err) => err.to_compile_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::service_impl;
    use proc_macro2::TokenStream;
    use quote::quote;

    fn expand(attr: TokenStream, item: TokenStream) -> syn::File {
        let out = service_impl(attr, item);
        match syn::parse2(out.clone()) {
            Ok(file) => file,
            Err(e) => panic!("expansion does not parse: {e}\n{out}"),
        }
    }

    /// The messages of the `compile_error!`s an expansion consists of.
    fn errors(attr: TokenStream, item: TokenStream) -> Vec<String> {
        let file = expand(attr, item);
        file.items
            .iter()
            .map(|item| match item {
                syn::Item::Macro(m)
                    if m.mac
                        .path
                        .segments
                        .last()
                        .is_some_and(|s| s.ident == "compile_error") =>
                {
                    let lit: syn::LitStr = m.mac.parse_body().expect("string literal");
                    lit.value()
                }
                other => panic!("expected only compile errors, got {}", quote!(#other)),
            })
            .collect()
    }

    fn item_names(file: &syn::File) -> Vec<String> {
        file.items
            .iter()
            .filter_map(|item| match item {
                syn::Item::Trait(t) => Some(format!("trait {}", t.ident)),
                syn::Item::Struct(s) => Some(format!("struct {}", s.ident)),
                _ => None,
            })
            .collect()
    }

    fn impl_fns<'a>(
        file: &'a syn::File,
        self_ty: &str,
        trait_: Option<&str>,
    ) -> Vec<&'a syn::ImplItemFn> {
        file.items
            .iter()
            .filter_map(|item| match item {
                syn::Item::Impl(i) => Some(i),
                _ => None,
            })
            .filter(|i| {
                let ty = &i.self_ty;
                let ty = quote!(#ty).to_string();
                let tr = i.trait_.as_ref().map(|(_, p, _)| {
                    p.segments
                        .last()
                        .map(|s| s.ident.to_string())
                        .unwrap_or_default()
                });
                ty.starts_with(self_ty) && tr.as_deref() == trait_
            })
            .flat_map(|i| &i.items)
            .filter_map(|item| match item {
                syn::ImplItem::Fn(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn generates_trait_server_and_client() {
        let file = expand(
            quote!(version = "2.0"),
            quote! {
                /// Users.
                pub trait UserService {
                    /// One user.
                    async fn get_user(&self, id: u64) -> User;
                    async fn ping(&self);
                }
            },
        );
        assert_eq!(
            item_names(&file),
            [
                "trait UserService",
                "struct UserServiceServer",
                "struct UserServiceClient"
            ]
        );

        let syn::Item::Trait(t) = &file.items[0] else {
            unreachable!()
        };
        let bounds = &t.supertraits;
        assert_eq!(
            quote!(#bounds).to_string(),
            quote!(::core::marker::Send + ::core::marker::Sync + 'static).to_string()
        );
        let syn::TraitItem::Fn(get_user) = &t.items[0] else {
            panic!("expected a method")
        };
        assert!(get_user.sig.asyncness.is_none());
        let output = &get_user.sig.output;
        assert_eq!(
            quote!(#output).to_string(),
            quote!(-> impl ::core::future::Future<Output = User> + ::core::marker::Send)
                .to_string()
        );
        assert!(get_user.attrs.iter().any(|a| a.path().is_ident("doc")));
        let syn::TraitItem::Fn(ping) = &t.items[1] else {
            panic!("expected a method")
        };
        let output = &ping.sig.output;
        assert!(quote!(#output).to_string().contains("Output = ()"));

        let client: Vec<String> = impl_fns(&file, "UserServiceClient", None)
            .iter()
            .map(|f| f.sig.ident.to_string())
            .collect();
        assert_eq!(
            client,
            [
                "from_config",
                "new",
                "from_service_client",
                "service_client",
                "with",
                "get_user",
                "ping"
            ]
        );
        let handler: Vec<String> = impl_fns(&file, "UserServiceServer", Some("ServiceHandler"))
            .iter()
            .map(|f| f.sig.ident.to_string())
            .collect();
        assert_eq!(
            handler,
            ["service_name", "service_version", "methods", "call"]
        );

        let text = quote!(#file).to_string();
        assert!(
            text.contains("SERVICE_NAME : & str = \"UserService\""),
            "{text}"
        );
        assert!(text.contains("SERVICE_VERSION : & str = \"2.0\""), "{text}");
        assert!(
            text.contains("METHODS : & [& str] = & [\"get_user\" , \"ping\"]"),
            "{text}"
        );
    }

    #[test]
    fn name_and_version_default_and_override() {
        let text = service_impl(
            quote!(),
            quote!(
                trait Greeter {}
            ),
        )
        .to_string();
        assert!(
            text.contains("SERVICE_NAME : & str = \"Greeter\""),
            "{text}"
        );
        assert!(text.contains("SERVICE_VERSION : & str = \"1.0\""), "{text}");

        let text = service_impl(
            quote!(name = "com.example.Greeter", version = "3"),
            quote!(
                trait Greeter {}
            ),
        )
        .to_string();
        assert!(text.contains("\"com.example.Greeter\""), "{text}");
        assert!(text.contains("SERVICE_VERSION : & str = \"3\""), "{text}");
    }

    #[test]
    fn raw_identifiers_are_unrawed_on_the_wire() {
        let text = service_impl(
            quote!(),
            quote!(
                trait r#Svc {
                    async fn r#type(&self) -> u8;
                }
            ),
        )
        .to_string();
        assert!(text.contains("\"type\" =>"), "{text}");
        assert!(text.contains("SvcClient"), "{text}");
        assert!(text.contains("SERVICE_NAME : & str = \"Svc\""), "{text}");
    }

    #[test]
    fn client_methods_keep_docs_and_wrap_the_output() {
        let file = expand(
            quote!(),
            quote! {
                trait S {
                    /// Renames.
                    #[deprecated]
                    async fn rename(&self, user: User, name: String) -> Result<User, AppError>;
                }
            },
        );
        let fns = impl_fns(&file, "SClient", None);
        let rename = fns
            .iter()
            .find(|f| f.sig.ident == "rename")
            .expect("client method");
        let output = &rename.sig.output;
        assert_eq!(
            quote!(#output).to_string(),
            quote!(-> ::core::result::Result<Result<User, AppError>, ::rpc::RpcError>).to_string()
        );
        assert!(rename.attrs.iter().any(|a| a.path().is_ident("deprecated")));
        let docs = rename
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .count();
        // The user's line, a blank separator and the generated paragraph.
        assert_eq!(docs, 3);
        let body_block = &rename.block;
        let body = quote!(#body_block).to_string();
        assert!(body.contains("(INFO , & (user , name ,))"), "{body}");
        assert!(body.contains("name : \"rename\""), "{body}");
        assert!(body.contains("idempotent : false"), "{body}");
    }

    #[test]
    fn method_attributes_reach_the_client_and_the_wire_name() {
        let file = expand(
            quote!(),
            quote! {
                trait S {
                    #[rpc(idempotent, timeout_ms = 250, name = "getUser")]
                    async fn get_user(&self, id: u64) -> u32;
                    async fn put(&self, id: u64) -> u32;
                }
            },
        );
        let text = quote!(#file).to_string();
        assert!(
            text.contains("name : \"getUser\" , idempotent : true"),
            "{text}"
        );
        assert!(text.contains("Duration :: from_millis (250u64)"), "{text}");
        assert!(
            text.contains("name : \"put\" , idempotent : false"),
            "{text}"
        );
        assert!(
            text.contains("METHODS : & [& str] = & [\"getUser\" , \"put\"]"),
            "{text}"
        );
        // Dispatch answers the wire name; the trait no longer carries `#[rpc]`.
        assert!(text.contains("\"getUser\" =>"), "{text}");
        assert!(!text.contains("# [rpc"), "{text}");
    }

    #[test]
    fn reports_every_invalid_signature_at_once() {
        let errs = errors(
            quote!(),
            quote! {
                trait S {
                    fn not_async(&self);
                    async fn by_value(self);
                    async fn by_mut(&mut self);
                    async fn no_receiver(id: u64);
                    async fn generic<T>(&self, t: T);
                    async fn pattern(&self, (a, b): (u32, u32));
                    async fn wildcard(&self, _: u32);
                    async fn borrowed(&self, name: &str);
                    async fn opaque(&self, it: impl Iterator<Item = u8>);
                    async fn default_body(&self) {}
                    async fn new(&self);
                    const C: u32;
                    type T;
                }
            },
        );
        let expected = [
            "must be `async fn`",
            "`self` by value",
            "`&mut self`",
            "must take `&self`",
            "cannot have generic parameters",
            "plain identifiers",
            "plain identifiers",
            "such as `String`",
            "`impl Trait`",
            "default body",
            "collides with the generated client's `new`",
            "associated constants",
            "associated types",
        ];
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        for (err, want) in errs.iter().zip(expected) {
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn rejects_bad_attribute_arguments() {
        let errs = errors(
            quote!(nmae = "X"),
            quote!(
                trait S {}
            ),
        );
        assert!(
            errs[0].contains("unknown `#[service]` argument `nmae`"),
            "{errs:?}"
        );
        let errs = errors(
            quote!(version = "1.0", version = "2.0"),
            quote!(
                trait S {}
            ),
        );
        assert!(errs[0].contains("duplicate"), "{errs:?}");
        let errs = errors(
            quote!(version = 1),
            quote!(
                trait S {}
            ),
        );
        assert!(errs[0].contains("string literal"), "{errs:?}");
        let errs = errors(
            quote!(name = "a:b"),
            quote!(
                trait S {}
            ),
        );
        assert!(errs[0].contains("must not contain ':'"), "{errs:?}");
        let errs = errors(
            quote!(version = ""),
            quote!(
                trait S {}
            ),
        );
        assert!(errs[0].contains("must not be empty"), "{errs:?}");
    }

    #[test]
    fn attribute_and_trait_errors_are_reported_together() {
        let errs = errors(
            quote!(bogus = "x"),
            quote!(
                trait S {
                    fn f(&self);
                }
            ),
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn rejects_non_traits() {
        let errs = errors(
            quote!(),
            quote!(
                struct S;
            ),
        );
        assert!(errs[0].contains("applies to a trait"), "{errs:?}");
    }

    #[test]
    fn suggests_owned_types() {
        let errs = errors(
            quote!(),
            quote! {
                trait S {
                    async fn a(&self, x: &[u8]) -> &'static str;
                    async fn b(&self, x: Vec<&u32>, y: std::borrow::Cow<'a, str>);
                    async fn c(&self) -> Self;
                }
            },
        );
        assert!(errs[0].contains("`Vec<u8>`"), "{errs:?}");
        assert!(
            errs[1].contains("return types") && errs[1].contains("`String`"),
            "{errs:?}"
        );
        assert!(errs[2].contains("`u32`"), "{errs:?}");
        assert!(errs[3].contains("`'static`"), "{errs:?}");
        assert!(errs[4].contains("`Self`"), "{errs:?}");
        assert_eq!(errs.len(), 5, "{errs:?}");
    }
}
