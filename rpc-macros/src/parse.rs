//! Parsing and validation: from the attribute and the annotated trait to a
//! [`Service`] that [`crate::expand`] can generate code for without further
//! checks.
//!
//! Every rule here exists because the generated server and client would
//! otherwise fail to compile with an error pointing into generated code. So
//! each violation is reported at the user's offending token, and all
//! violations are reported at once.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::visit::{self, Visit};
use syn::{
    Attribute, FnArg, Generics, Ident, Item, ItemTrait, LitStr, Pat, ReturnType, Signature, Token,
    TraitItem, TraitItemFn, Type, TypeParamBound, Visibility,
};

/// Version used when the attribute does not name one.
const DEFAULT_VERSION: &str = "1.0";

/// Inherent items of the generated client. A trait method with one of these
/// names would collide with them.
const RESERVED_CLIENT_NAMES: &[&str] = &[
    "new",
    "from_config",
    "from_service_client",
    "service_client",
    "with",
];

/// Longest `#[rpc(timeout_ms)]`: a day, like `rpc.toml`'s durations.
const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// A validated `#[service]` trait.
pub(crate) struct Service {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) ident: Ident,
    /// The user's supertraits; `Send + Sync + 'static` are added on expansion.
    pub(crate) supertraits: Punctuated<TypeParamBound, Token![+]>,
    /// Service name on the wire and in the registry.
    pub(crate) name: String,
    /// Service version on the wire and in the registry.
    pub(crate) version: String,
    pub(crate) methods: Vec<Method>,
}

/// A validated `async fn name(&self, args..) -> Output;`.
pub(crate) struct Method {
    /// Every attribute, for the rewritten trait.
    pub(crate) attrs: Vec<Attribute>,
    /// The attributes that also make sense on the client method (docs,
    /// deprecation).
    pub(crate) client_attrs: Vec<Attribute>,
    pub(crate) ident: Ident,
    /// The method name as sent on the wire: `#[rpc(name = "..")]`, or the
    /// identifier without `r#`.
    pub(crate) wire_name: String,
    /// `#[rpc(idempotent)]`.
    pub(crate) idempotent: bool,
    /// `#[rpc(timeout_ms = N)]`.
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) args: Vec<Arg>,
    /// `None` for a method without `->`.
    pub(crate) output: Option<Type>,
    /// Span of the whole signature, for generated code derived from it.
    pub(crate) span: Span,
    /// Span of the parenthesized parameter list.
    pub(crate) params_span: Span,
}

/// One `name: Type` argument.
pub(crate) struct Arg {
    pub(crate) ident: Ident,
    pub(crate) ty: Type,
}

/// Collects errors so one expansion reports every problem, not just the first.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    fn spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// The arguments of `#[service(...)]`.
#[derive(Default)]
struct ServiceArgs {
    name: Option<LitStr>,
    version: Option<LitStr>,
}

fn parse_args(attr: TokenStream) -> syn::Result<ServiceArgs> {
    let mut args = ServiceArgs::default();
    let parser = syn::meta::parser(|meta| {
        let slot = if meta.path.is_ident("name") {
            &mut args.name
        } else if meta.path.is_ident("version") {
            &mut args.version
        } else {
            let key = type_text(&meta.path);
            return Err(meta.error(format!(
                "unknown `#[service]` argument `{key}`; expected `name = \"...\"` or `version = \"...\"`"
            )));
        };
        if slot.is_some() {
            return Err(meta.error("duplicate `#[service]` argument"));
        }
        let value: LitStr = meta.value()?.parse()?;
        *slot = Some(value);
        Ok(())
    });
    syn::parse::Parser::parse2(parser, attr)?;
    Ok(args)
}

/// Registry keys are `name:version` and registries use `/` as a path
/// separator: either character (or whitespace) in a part would make keys
/// ambiguous.
fn check_key_part(errors: &mut Errors, lit: &LitStr, what: &str) -> String {
    let value = lit.value();
    if value.is_empty() {
        errors.spanned(lit, format!("the service {what} must not be empty"));
    } else if let Some(c) = value
        .chars()
        .find(|c| *c == ':' || *c == '/' || c.is_whitespace() || c.is_control())
    {
        errors.spanned(
            lit,
            format!(
                "the service {what} must not contain {c:?}: registry keys are `name:version` \
                 and `/` separates registry paths"
            ),
        );
    }
    value
}

/// Parses and validates the attribute arguments and the annotated item.
pub(crate) fn parse(attr: TokenStream, item: TokenStream) -> syn::Result<Service> {
    let mut errors = Errors::default();
    // Validate the trait even when the attribute is malformed, so the user
    // sees every problem in one build.
    let args = match parse_args(attr) {
        Ok(args) => args,
        Err(e) => {
            errors.push(e);
            ServiceArgs::default()
        }
    };
    let item: Item = syn::parse2(item)?;
    let Item::Trait(item) = item else {
        return Err(syn::Error::new_spanned(
            item,
            "`#[service]` applies to a trait: `pub trait MyService { async fn call(&self, ..) -> T; }`",
        ));
    };

    let name = match &args.name {
        Some(lit) => check_key_part(&mut errors, lit, "name"),
        None => item.ident.unraw().to_string(),
    };
    let version = match &args.version {
        Some(lit) => check_key_part(&mut errors, lit, "version"),
        None => DEFAULT_VERSION.to_owned(),
    };

    check_trait_header(&mut errors, &item);

    let mut methods = Vec::new();
    for trait_item in &item.items {
        match trait_item {
            TraitItem::Fn(f) => methods.push(parse_method(&mut errors, f)),
            TraitItem::Const(c) => errors.spanned(
                c,
                "associated constants are not supported in a `#[service]` trait: \
                 only `async fn` methods can be called remotely",
            ),
            TraitItem::Type(t) => errors.spanned(
                t,
                "associated types are not supported in a `#[service]` trait: \
                 the client must know every argument and return type",
            ),
            other => errors.spanned(
                other,
                "only `async fn` methods are allowed in a `#[service]` trait",
            ),
        }
    }
    for (i, m) in methods.iter().enumerate() {
        if let Some(first) = methods[..i].iter().find(|o| o.wire_name == m.wire_name) {
            errors.spanned(
                &m.ident,
                format!(
                    "two methods are called `{}` on the wire (`{}` and `{}`): give one another \
                     `#[rpc(name = \"...\")]`",
                    m.wire_name, first.ident, m.ident
                ),
            );
        }
    }
    errors.finish()?;

    let ItemTrait {
        attrs,
        vis,
        ident,
        supertraits,
        ..
    } = item;
    Ok(Service {
        attrs,
        vis,
        ident,
        supertraits,
        name,
        version,
        methods,
    })
}

fn check_trait_header(errors: &mut Errors, item: &ItemTrait) {
    for attr in item.attrs.iter().filter(|a| a.path().is_ident("rpc")) {
        errors.spanned(
            attr,
            "`#[rpc(..)]` goes on methods; service arguments go in `#[service(name = .., version = ..)]`",
        );
    }
    if let Some(u) = &item.unsafety {
        errors.spanned(u, "a `#[service]` trait cannot be `unsafe`");
    }
    if let Some(a) = &item.auto_token {
        errors.spanned(a, "a `#[service]` trait cannot be an auto trait");
    }
    check_generics(
        errors,
        &item.generics,
        "a `#[service]` trait cannot have generic parameters or a `where` clause: the server \
         and client are generated for concrete types",
    );
}

fn check_generics(errors: &mut Errors, generics: &Generics, message: &str) {
    if !generics.params.is_empty() {
        errors.spanned(&generics.params, message);
    }
    if let Some(w) = &generics.where_clause {
        errors.spanned(w, message);
    }
}

/// Validates one method, recording what is wrong with it in `errors`.
fn parse_method(errors: &mut Errors, f: &TraitItemFn) -> Method {
    let sig = &f.sig;
    for attr in &f.attrs {
        if attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr") {
            // The method list and dispatch `match` are generated from the
            // unexpanded trait: a configured-out method would still be
            // dispatched to.
            errors.spanned(
                attr,
                "`#[cfg]` is not supported on `#[service]` methods: put it on the whole trait",
            );
        }
    }

    let rpc_attrs = parse_rpc_attrs(errors, &f.attrs);

    check_signature_header(errors, sig);
    check_generics(
        errors,
        &sig.generics,
        "`#[service]` methods cannot have generic parameters or a `where` clause: the server \
         must know the concrete argument and return types to decode them",
    );
    if let Some(body) = &f.default {
        errors.spanned(
            body,
            "`#[service]` methods cannot have a default body: implement every method in the \
             `impl` of the trait",
        );
    }

    let mut inputs = sig.inputs.iter();
    check_receiver(errors, sig, inputs.next());

    let mut args = Vec::new();
    for input in inputs {
        match input {
            FnArg::Typed(pt) => {
                if let Some(attr) = pt.attrs.first() {
                    errors.spanned(
                        attr,
                        "attributes on `#[service]` method arguments are not supported",
                    );
                }
                let ident = match &*pt.pat {
                    Pat::Ident(pi)
                        if pi.by_ref.is_none()
                            && pi.mutability.is_none()
                            && pi.subpat.is_none() =>
                    {
                        Some(pi.ident.clone())
                    }
                    Pat::Ident(pi) if pi.mutability.is_some() && pi.by_ref.is_none() => {
                        errors.spanned(
                            pi,
                            format!(
                                "`#[service]` method arguments must be plain identifiers: \
                                 write `{}: ...` (an implementation may still bind it as `mut`)",
                                pi.ident
                            ),
                        );
                        None
                    }
                    pat => {
                        errors.spanned(
                            pat,
                            "`#[service]` method arguments must be plain identifiers \
                             (`name: Type`): the generated client uses them as parameter names",
                        );
                        None
                    }
                };
                check_type(errors, &pt.ty, TypePosition::Argument);
                if let Some(ident) = ident {
                    args.push(Arg {
                        ident,
                        ty: (*pt.ty).clone(),
                    });
                }
            }
            FnArg::Receiver(r) => {
                // Only reachable for a second `self`, which rustc rejects as well;
                // say it once, at the right place.
                errors.spanned(r, "`self` must be the first parameter");
            }
        }
    }

    let output = match &sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => {
            // A non-async method's return type is usually `impl Future`: the
            // `async` error already says what to do.
            if sig.asyncness.is_some() {
                check_type(errors, ty, TypePosition::Return);
            }
            Some((**ty).clone())
        }
    };

    let ident = sig.ident.clone();
    let rust_name = ident.unraw().to_string();
    if RESERVED_CLIENT_NAMES.contains(&rust_name.as_str()) {
        errors.spanned(
            &ident,
            format!(
                "`{rust_name}` cannot be a `#[service]` method name: it collides with the \
                 generated client's `{rust_name}`; rename the method (`#[rpc(name = \"{rust_name}\")]` \
                 keeps its name on the wire)"
            ),
        );
    }
    let wire_name = rpc_attrs.name.unwrap_or(rust_name);

    let client_attrs = f
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc") || a.path().is_ident("deprecated"))
        .cloned()
        .collect();
    Method {
        // `#[rpc]` is ours: the rewritten trait must not carry it.
        attrs: f
            .attrs
            .iter()
            .filter(|a| !a.path().is_ident("rpc"))
            .cloned()
            .collect(),
        client_attrs,
        ident,
        wire_name,
        idempotent: rpc_attrs.idempotent,
        timeout_ms: rpc_attrs.timeout_ms,
        args,
        output,
        span: sig.span(),
        params_span: sig.paren_token.span.join(),
    }
}

/// What `#[rpc(..)]` on a method says.
#[derive(Default)]
struct RpcAttrs {
    idempotent: bool,
    timeout_ms: Option<u64>,
    name: Option<String>,
}

const RPC_ATTR_USAGE: &str =
    "expected `#[rpc(idempotent)]`, `#[rpc(timeout_ms = 500)]` or `#[rpc(name = \"getUser\")]`";

/// Reads every `#[rpc(..)]` of a method; bad usage is an error on the
/// offending token.
fn parse_rpc_attrs(errors: &mut Errors, attrs: &[Attribute]) -> RpcAttrs {
    let mut out = RpcAttrs::default();
    let mut seen_idempotent = false;
    for attr in attrs.iter().filter(|a| a.path().is_ident("rpc")) {
        let syn::Meta::List(list) = &attr.meta else {
            errors.spanned(attr, RPC_ATTR_USAGE);
            continue;
        };
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("idempotent") {
                if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                    return Err(
                        meta.error("`idempotent` takes no value: write `#[rpc(idempotent)]`")
                    );
                }
                if seen_idempotent {
                    return Err(meta.error("duplicate `#[rpc]` argument `idempotent`"));
                }
                seen_idempotent = true;
                out.idempotent = true;
            } else if meta.path.is_ident("timeout_ms") {
                if out.timeout_ms.is_some() {
                    return Err(meta.error("duplicate `#[rpc]` argument `timeout_ms`"));
                }
                let lit: syn::LitInt = meta.value()?.parse().map_err(|e| {
                    syn::Error::new(e.span(), "`timeout_ms` takes an integer number of milliseconds, e.g. `timeout_ms = 500`")
                })?;
                let ms: u64 = lit.base10_parse()?;
                if ms == 0 || ms > MAX_TIMEOUT_MS {
                    return Err(syn::Error::new(
                        lit.span(),
                        format!("`timeout_ms` must be between 1 and {MAX_TIMEOUT_MS} (a day)"),
                    ));
                }
                out.timeout_ms = Some(ms);
            } else if meta.path.is_ident("name") {
                if out.name.is_some() {
                    return Err(meta.error("duplicate `#[rpc]` argument `name`"));
                }
                let lit: LitStr = meta.value()?.parse()?;
                let v = lit.value();
                if v.is_empty()
                    || v.chars().any(|c| c.is_whitespace() || c.is_control())
                    || v.len() > 255
                {
                    return Err(syn::Error::new(
                        lit.span(),
                        "a wire name must be 1 to 255 bytes with no whitespace or control characters",
                    ));
                }
                out.name = Some(v);
            } else {
                let key = type_text(&meta.path);
                return Err(meta.error(format!(
                    "unknown `#[rpc]` argument `{key}`; expected `idempotent`, `timeout_ms = N` or `name = \"...\"`"
                )));
            }
            Ok(())
        });
        if let Err(e) = syn::parse::Parser::parse2(parser, list.tokens.clone()) {
            errors.push(e);
        }
    }
    out
}

fn check_signature_header(errors: &mut Errors, sig: &Signature) {
    if let Some(c) = &sig.constness {
        errors.spanned(c, "`#[service]` methods cannot be `const`");
    }
    if let Some(u) = &sig.unsafety {
        errors.spanned(u, "`#[service]` methods cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, "`#[service]` methods cannot declare an ABI");
    }
    if let Some(v) = &sig.variadic {
        errors.spanned(v, "`#[service]` methods cannot be variadic");
    }
    if sig.asyncness.is_none() {
        errors.spanned(
            sig.fn_token,
            format!(
                "`#[service]` methods must be `async fn`: write `async fn {}(&self, ..)`; \
                 the macro adds the `Send` bound to the returned future itself",
                sig.ident
            ),
        );
    }
}

fn check_receiver(errors: &mut Errors, sig: &Signature, first: Option<&FnArg>) {
    const SHARED: &str =
        "the server calls methods concurrently through a shared reference, so take `&self`";
    let Some(FnArg::Receiver(r)) = first else {
        errors.at(
            sig.paren_token.span.join(),
            format!(
                "`#[service]` methods must take `&self` as their first parameter: \
                 write `async fn {}(&self, ..)`",
                sig.ident
            ),
        );
        return;
    };
    if r.colon_token.is_some() {
        errors.spanned(
            r,
            format!("explicit `self` types are not supported in `#[service]` methods: {SHARED}"),
        );
    } else if let Some((_, lifetime)) = &r.reference {
        if r.mutability.is_some() {
            errors.spanned(
                r,
                format!(
                    "`&mut self` is not supported in `#[service]` methods: {SHARED} and keep \
                     mutable state behind a lock (e.g. `std::sync::Mutex`)"
                ),
            );
        } else if let Some(lt) = lifetime {
            errors.spanned(
                lt,
                "`#[service]` methods cannot name the receiver's lifetime: write `&self`",
            );
        }
    } else {
        errors.spanned(
            r,
            format!("`self` by value is not supported in `#[service]` methods: {SHARED}"),
        );
    }
}

#[derive(Clone, Copy)]
enum TypePosition {
    Argument,
    Return,
}

/// Walks a type for what cannot cross the wire in generated code: borrows
/// (arguments are decoded into owned values, results are decoded on the
/// client), `impl Trait`, and `Self` (which means the client in client code).
fn check_type(errors: &mut Errors, ty: &Type, position: TypePosition) {
    struct Checker<'e> {
        errors: &'e mut Errors,
        position: TypePosition,
    }

    impl<'ast> Visit<'ast> for Checker<'_> {
        fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
            let (what, why) = match self.position {
                TypePosition::Argument => {
                    ("argument", "the server decodes arguments into owned values")
                }
                TypePosition::Return => (
                    "return",
                    "the client decodes the result into an owned value",
                ),
            };
            self.errors.spanned(
                r,
                format!(
                    "borrowed {what} types are not supported in `#[service]` methods: {why}; \
                     use an owned type such as {}",
                    owned_suggestion(r)
                ),
            );
            // Nested borrows would repeat the same advice.
        }

        fn visit_type_impl_trait(&mut self, t: &'ast syn::TypeImplTrait) {
            self.errors.spanned(
                t,
                "`impl Trait` is not supported in `#[service]` methods: use a concrete type \
                 that implements `Serialize` and `Deserialize`",
            );
        }

        fn visit_lifetime(&mut self, lt: &'ast syn::Lifetime) {
            if lt.ident != "static" {
                self.errors.spanned(
                    lt,
                    "only `'static` lifetimes are allowed in `#[service]` signatures: values \
                     are decoded into owned data",
                );
            }
        }

        fn visit_type_path(&mut self, p: &'ast syn::TypePath) {
            if p.qself.is_none()
                && p.path.leading_colon.is_none()
                && p.path.segments.first().is_some_and(|s| s.ident == "Self")
            {
                self.errors.spanned(
                    p,
                    "`Self` is not allowed in `#[service]` signatures: in the generated client \
                     it would name the client; write the concrete type",
                );
                return;
            }
            visit::visit_type_path(self, p);
        }
    }

    Checker { errors, position }.visit_type(ty);
}

/// A concrete replacement for a borrowed type, for the error message.
fn owned_suggestion(r: &syn::TypeReference) -> String {
    let inner = &*r.elem;
    match inner {
        Type::Path(p) if p.qself.is_none() && p.path.is_ident("str") => "`String`".to_owned(),
        Type::Path(p) if p.qself.is_none() && p.path.is_ident("Path") => "`PathBuf`".to_owned(),
        Type::Slice(s) => format!("`Vec<{}>`", type_text(&s.elem)),
        other => format!("`{}`", type_text(other)),
    }
}

/// Tokens as a user would write them, for messages: `Vec<u8>`, not
/// `Vec < u8 >`.
fn type_text(tokens: &impl ToTokens) -> String {
    let mut text = tokens.to_token_stream().to_string();
    for (from, to) in [
        (" :: ", "::"),
        (":: ", "::"),
        (" < ", "<"),
        ("< ", "<"),
        (" >", ">"),
        (" ,", ","),
        ("& ", "&"),
    ] {
        text = text.replace(from, to);
    }
    text
}
