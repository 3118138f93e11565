//! The #[service] attribute macro (placeholder).
use proc_macro::TokenStream;

/// Placeholder.
#[proc_macro_attribute]
pub fn service(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
