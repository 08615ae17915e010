//! The config model as the reference describes it, read from the Rust sources with `syn`.
//!
//! [`Sources`] indexes the items of `shared/src/config/*.rs` (plus `shared/src/queue/mod.rs`, where
//! `FullPolicy` lives); [`build`] walks a program's root struct and turns every field into a [`Key`] of a
//! [`Table`]. Whatever the walker does not understand (a serde attribute it has no rule for, a type it cannot
//! name for an operator) stops it with a message saying what to teach it, rather than producing a reference
//! that is silently wrong.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use syn::{Attribute, Expr, Fields, Item, Lit, Type};

/// One program: its root table first, then every other table in depth-first field order.
pub(crate) struct Program {
    /// `edge-agent` or `cloud-hub`.
    pub(crate) name: &'static str,
    /// Prefix of its environment variables.
    pub(crate) env_prefix: &'static str,
    /// Tables, root first.
    pub(crate) tables: Vec<Table>,
}

/// One TOML table: the root, a `[section]`, an element of an `[[array]]`, or one `kind` of a tagged section.
pub(crate) struct Table {
    /// Key path from the root.
    pub(crate) path: Vec<String>,
    /// Whether the table is an element of an array of tables (`[[routes]]`).
    pub(crate) array: bool,
    /// Whether it, or a table around it, is an element of an array (its keys have no environment form).
    pub(crate) in_array: bool,
    /// For a variant of a tagged enum: the tag key and this variant's value (`kind`, `embedded`).
    pub(crate) variant: Option<(String, String)>,
    /// Whether the table must be written, and what happens when it is not.
    pub(crate) presence: Presence,
    /// The Rust type, for messages.
    pub(crate) rust_type: String,
    /// Doc paragraphs (the variant's, then the struct's).
    pub(crate) doc: Vec<String>,
    /// Its keys in declaration order.
    pub(crate) keys: Vec<Key>,
}

/// Whether a table must appear.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// The root.
    Root,
    /// Must be written.
    Required,
    /// May be left out; then every key below takes its default.
    Defaulted,
    /// May be left out; then the feature it configures is off or unset.
    Optional,
}

/// One key of a table.
pub(crate) struct Key {
    /// The name as written in TOML.
    pub(crate) name: String,
    /// What kind of value it takes.
    pub(crate) kind: Kind,
    /// What it is when left out (`Required` if it cannot be).
    pub(crate) default: DefaultValue,
    /// Doc paragraphs.
    pub(crate) doc: Vec<String>,
}

impl Key {
    pub(crate) fn required(&self) -> bool {
        matches!(self.default, DefaultValue::Required)
    }
}

/// The value a key takes, as an operator writes it.
#[derive(Clone)]
pub(crate) enum Kind {
    Str,
    Secret,
    Bool,
    Int,
    Duration,
    Size,
    HostPort,
    SocketAddr,
    Path,
    /// A string out of a closed set: (value, doc, aliases).
    Enum(Vec<EnumValue>),
    /// `"*"`, a site name, or an array of site names.
    Sites,
    /// An array of scalars.
    Array(Box<Self>),
    /// A sub-table (index into the program's tables).
    Table(usize),
    /// An array of tables (index of the element table).
    Tables(usize),
    /// A table whose keys depend on its tag key: (tag, [(value, table index)]).
    Tagged(String, Vec<(String, usize)>),
    /// The tag key inside a variant's table, with its one value.
    Tag(String),
}

impl Kind {
    /// The example value shown in the reference's type column (for kinds that have one), and written into
    /// the sample documents the checks deserialize, so every example shown is one the model accepts.
    pub(crate) fn example(&self) -> Option<&'static str> {
        Some(match self {
            Self::Duration => "30s",
            Self::Size => "64MiB",
            Self::HostPort => "example.com:4433",
            Self::SocketAddr => "127.0.0.1:1883",
            _ => return None,
        })
    }
}

/// One value of a string enum.
#[derive(Clone)]
pub(crate) struct EnumValue {
    pub(crate) value: String,
    pub(crate) aliases: Vec<String>,
    pub(crate) doc: Vec<String>,
}

/// What a key is when it is left out.
pub(crate) enum DefaultValue {
    Required,
    /// `Option` left unset.
    Unset,
    /// An empty array.
    Empty,
    /// A value read from a `default_*` fn, a `Default` impl or the type's own default.
    Value(Val),
    /// A table whose keys all have defaults.
    Table,
    /// A default fn the evaluator cannot read: its name.
    Computed(String),
}

/// A default value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    Int(u128),
    Bool(bool),
    Str(String),
    Duration(Duration),
    Size(u64),
    Addr(String),
    Enum(String),
}

impl Val {
    /// The value as it is written in TOML.
    pub(crate) fn toml(&self) -> String {
        match self {
            Self::Int(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
            Self::Str(s) | Self::Addr(s) | Self::Enum(s) => format!("{s:?}"),
            Self::Duration(d) => format!("\"{}\"", format_duration(*d)),
            Self::Size(n) => format!("\"{}\"", shared::config::ByteSize(*n)),
        }
    }
}

/// A duration in its largest whole unit (`"7d"`, `"100ms"`), which humantime reads back.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    const UNITS: [(u128, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
        (1, "ms"),
    ];
    if ms == 0 || d.subsec_nanos() % 1_000_000 != 0 {
        return format!("{}ns", d.as_nanos());
    }
    let (unit, name) = UNITS
        .into_iter()
        .find(|(unit, _)| ms % unit == 0)
        .expect("invariant: 1 ms divides every whole number of ms");
    format!("{}{name}", ms / unit)
}

/// The parsed source files and their items by name.
pub(crate) struct Sources {
    files: Vec<(String, syn::File)>,
    types: HashMap<String, (usize, TypeItem)>,
    fns: HashMap<(usize, String), syn::ItemFn>,
    consts: HashMap<String, (usize, syn::ItemConst)>,
    default_impls: HashMap<String, (usize, syn::ItemImpl)>,
}

#[derive(Clone)]
enum TypeItem {
    Struct(syn::ItemStruct),
    Enum(syn::ItemEnum),
}

impl Sources {
    /// Parses `shared/src/config/*.rs` and `shared/src/queue/mod.rs` under `shared_dir`.
    pub(crate) fn load(shared_dir: &Path) -> Self {
        let mut paths: Vec<_> = std::fs::read_dir(shared_dir.join("src/config"))
            .expect("read shared/src/config")
            .map(|e| e.expect("list shared/src/config").path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        paths.sort();
        paths.push(shared_dir.join("src/queue/mod.rs"));
        let mut sources = Self {
            files: Vec::new(),
            types: HashMap::new(),
            fns: HashMap::new(),
            consts: HashMap::new(),
            default_impls: HashMap::new(),
        };
        for path in paths {
            let text = std::fs::read_to_string(&path).expect("read a config source file");
            let file = syn::parse_file(&text)
                .unwrap_or_else(|e| panic!("{}: not parseable by syn: {e}", path.display()));
            let name = path
                .strip_prefix(shared_dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            let index = sources.files.len();
            for item in &file.items {
                sources.index_item(index, &name, item);
            }
            sources.files.push((name, file));
        }
        sources
    }

    fn index_item(&mut self, file: usize, file_name: &str, item: &Item) {
        let mut add_type = |name: String, item: TypeItem| {
            if let Some((other, _)) = self.types.insert(name.clone(), (file, item)) {
                panic!(
                    "type {name} is defined twice (file #{other} and {file_name}); the generator looks types up by name"
                );
            }
        };
        match item {
            Item::Struct(s) => add_type(s.ident.to_string(), TypeItem::Struct(s.clone())),
            Item::Enum(e) => add_type(e.ident.to_string(), TypeItem::Enum(e.clone())),
            Item::Fn(f) => {
                self.fns.insert((file, f.sig.ident.to_string()), f.clone());
            }
            Item::Const(c) => {
                self.consts.insert(c.ident.to_string(), (file, c.clone()));
            }
            Item::Impl(i) => {
                let is_default = i
                    .trait_
                    .as_ref()
                    .is_some_and(|(path, _)| last_ident(path) == "Default");
                if let (true, Type::Path(ty)) = (is_default, &*i.self_ty) {
                    self.default_impls
                        .insert(last_ident(&ty.path), (file, i.clone()));
                }
            }
            _ => {}
        }
    }

    /// A constant's value, if it is one the evaluator can read (for `FRAME_OVERHEAD` in doc text).
    pub(crate) fn const_value(&self, name: &str) -> Option<Val> {
        let (file, item) = self.consts.get(name)?;
        self.eval(&item.expr, *file)
    }

    fn serde_type(&self, name: &str) -> Option<(usize, TypeItem)> {
        let (file, item) = self.types.get(name)?;
        let attrs = match item {
            TypeItem::Struct(s) => &s.attrs,
            TypeItem::Enum(e) => &e.attrs,
        };
        derives(attrs, "Deserialize").then(|| (*file, item.clone()))
    }

    /// Evaluates a default expression written in the styles the model uses; `None` for anything else.
    fn eval(&self, expr: &Expr, file: usize) -> Option<Val> {
        match expr {
            Expr::Lit(lit) => match &lit.lit {
                Lit::Int(i) => i.base10_parse().ok().map(Val::Int),
                Lit::Bool(b) => Some(Val::Bool(b.value)),
                Lit::Str(s) => Some(Val::Str(s.value())),
                _ => None,
            },
            Expr::Paren(p) => self.eval(&p.expr, file),
            Expr::Group(g) => self.eval(&g.expr, file),
            Expr::Block(b) => self.eval_block(&b.block, file),
            Expr::Binary(b) => {
                let (Val::Int(l), Val::Int(r)) =
                    (self.eval(&b.left, file)?, self.eval(&b.right, file)?)
                else {
                    return None;
                };
                match b.op {
                    syn::BinOp::Mul(_) => l.checked_mul(r),
                    syn::BinOp::Add(_) => l.checked_add(r),
                    syn::BinOp::Sub(_) => l.checked_sub(r),
                    _ => None,
                }
                .map(Val::Int)
            }
            Expr::MethodCall(m)
                if m.args.is_empty()
                    && ["to_owned", "to_string", "into"].contains(&&*m.method.to_string()) =>
            {
                match self.eval(&m.receiver, file)? {
                    Val::Str(s) => Some(Val::Str(s)),
                    _ => None,
                }
            }
            Expr::Call(call) => {
                let Expr::Path(func) = &*call.func else {
                    return None;
                };
                let segments: Vec<String> = func
                    .path
                    .segments
                    .iter()
                    .map(|s| s.ident.to_string())
                    .collect();
                let last = segments.last()?.as_str();
                let owner = segments.len().checked_sub(2).map(|i| segments[i].as_str());
                let args: Vec<&Expr> = call.args.iter().collect();
                let int = |i: usize| match self.eval(args.get(i)?, file)? {
                    Val::Int(n) => u64::try_from(n).ok(),
                    _ => None,
                };
                match (owner, last, args.len()) {
                    (Some("ByteSize"), "kib", 1) => Some(Val::Size(int(0)?.checked_mul(1 << 10)?)),
                    (Some("ByteSize"), "mib", 1) => Some(Val::Size(int(0)?.checked_mul(1 << 20)?)),
                    (Some("ByteSize"), "gib", 1) => Some(Val::Size(int(0)?.checked_mul(1 << 30)?)),
                    (_, "ByteSize", 1) => Some(Val::Size(int(0)?)),
                    (Some("Duration"), "from_secs", 1) => {
                        Some(Val::Duration(Duration::from_secs(int(0)?)))
                    }
                    (Some("Duration"), "from_millis", 1) => {
                        Some(Val::Duration(Duration::from_millis(int(0)?)))
                    }
                    (Some("SocketAddr"), "from", 1) => self.eval_socket_addr(args[0], file),
                    (Some(ty), "default", 0) => self.type_default(ty),
                    (None, name, 0) => {
                        let f = self.fns.get(&(file, name.to_owned()))?;
                        self.eval_block(&f.block, file)
                    }
                    _ => None,
                }
            }
            Expr::Path(p) => {
                let segments: Vec<String> = p
                    .path
                    .segments
                    .iter()
                    .map(|s| s.ident.to_string())
                    .collect();
                if let [.., owner, variant] = &segments[..] {
                    let (_, TypeItem::Enum(e)) = self.serde_type(owner)? else {
                        return None;
                    };
                    let v = e.variants.iter().find(|v| v.ident == variant)?;
                    return Some(Val::Enum(variant_name(&e.attrs, v)));
                }
                self.const_value(segments.last()?)
            }
            _ => None,
        }
    }

    fn eval_block(&self, block: &syn::Block, file: usize) -> Option<Val> {
        match &block.stmts[..] {
            [syn::Stmt::Expr(e, None)] => self.eval(e, file),
            _ => None,
        }
    }

    /// `SocketAddr::from(([127, 0, 0, 1], 1883))`.
    fn eval_socket_addr(&self, arg: &Expr, file: usize) -> Option<Val> {
        let Expr::Tuple(t) = arg else { return None };
        let [Expr::Array(ip), port] = &t.elems.iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        let octets: Option<Vec<String>> = ip
            .elems
            .iter()
            .map(|e| match self.eval(e, file)? {
                Val::Int(n) => Some(n.to_string()),
                _ => None,
            })
            .collect();
        let Val::Int(port) = self.eval(port, file)? else {
            return None;
        };
        Some(Val::Addr(format!("{}:{port}", octets?.join("."))))
    }

    /// `T::default()` for an enum with a `#[default]` variant or a `Default` impl returning a readable value.
    fn type_default(&self, ty: &str) -> Option<Val> {
        if let Some((_, TypeItem::Enum(e))) = self.serde_type(ty) {
            if let Some(v) = e
                .variants
                .iter()
                .find(|v| v.attrs.iter().any(|a| a.path().is_ident("default")))
            {
                return Some(Val::Enum(variant_name(&e.attrs, v)));
            }
        }
        let (file, item) = self.default_impls.get(ty)?;
        item.items.iter().find_map(|i| match i {
            syn::ImplItem::Fn(f) if f.sig.ident == "default" => self.eval_block(&f.block, *file),
            _ => None,
        })
    }
}

/// Builds the tables of the program whose root struct is `root`.
pub(crate) fn build(
    sources: &Sources,
    name: &'static str,
    root: &str,
    env_prefix: &'static str,
) -> Program {
    let mut walker = Walker {
        sources,
        tables: Vec::new(),
    };
    walker.walk_struct(root, &[], false, false, None, Presence::Root, Vec::new());
    Program {
        name,
        env_prefix,
        tables: walker.tables,
    }
}

struct Walker<'a> {
    sources: &'a Sources,
    tables: Vec<Table>,
}

/// The serde attributes of a field that the walker understands.
#[derive(Default)]
struct FieldAttrs {
    /// `default` (None inside) or `default = "fn"` (Some).
    default: Option<Option<String>>,
    humantime: bool,
    rename: Option<String>,
}

impl Walker<'_> {
    #[allow(clippy::too_many_arguments)]
    fn walk_struct(
        &mut self,
        ty: &str,
        path: &[String],
        array: bool,
        in_array: bool,
        variant: Option<(String, String)>,
        presence: Presence,
        mut doc: Vec<String>,
    ) -> usize {
        let (file, item) = self
            .sources
            .serde_type(ty)
            .unwrap_or_else(|| panic!("{}: no serde struct {ty} in the sources", path.join(".")));
        let TypeItem::Struct(item) = item else {
            panic!(
                "{}: {ty} is an enum where a table was expected",
                path.join(".")
            );
        };
        let rename_all = container_attrs(&item.attrs, ty, &["deny_unknown_fields"]);
        if !container_flag(&item.attrs, "deny_unknown_fields") {
            panic!("{ty}: no #[serde(deny_unknown_fields)]; STYLE.md §4 wants it on every config struct");
        }
        doc.extend(doc_paragraphs(&item.attrs));
        let index = self.tables.len();
        self.tables.push(Table {
            path: path.to_vec(),
            array,
            in_array,
            variant: variant.clone(),
            presence,
            rust_type: ty.to_owned(),
            doc,
            keys: Vec::new(),
        });
        let mut keys = Vec::new();
        if let Some((tag, value)) = variant {
            keys.push(Key {
                name: tag,
                kind: Kind::Tag(value),
                default: DefaultValue::Required,
                doc: Vec::new(),
            });
        }
        let Fields::Named(fields) = &item.fields else {
            panic!("{ty}: only structs with named fields are config tables");
        };
        for field in &fields.named {
            let ident = field.ident.as_ref().expect("named field").to_string();
            let attrs = field_attrs(&field.attrs, ty, &ident);
            let name = attrs
                .rename
                .clone()
                .unwrap_or_else(|| rename(&ident, rename_all.as_deref()));
            let mut key_path = path.to_vec();
            key_path.push(name.clone());
            let doc = doc_paragraphs(&field.attrs);
            let key = self.field(&field.ty, &attrs, key_path, in_array, file, doc);
            keys.push(key);
        }
        self.tables[index].keys = keys;
        index
    }

    fn field(
        &mut self,
        ty: &Type,
        attrs: &FieldAttrs,
        path: Vec<String>,
        in_array: bool,
        file: usize,
        doc: Vec<String>,
    ) -> Key {
        let at = path.join(".");
        let (outer, inner) = type_parts(ty);
        let optional = outer == "Option";
        let (ty, ty_name) = if optional {
            let inner = inner.unwrap_or_else(|| panic!("{at}: Option without a type"));
            (inner, type_parts(inner).0)
        } else {
            (ty, outer)
        };
        let name = path.last().expect("a key path is never empty").clone();
        let (kind, struct_default) = self.kind(ty, &ty_name, attrs, &path, in_array, optional);
        if ty_name == "Duration" && !attrs.humantime {
            panic!(
                "{at}: a Duration without `with = \"humantime_serde\"` is not a humantime string"
            );
        }
        let default = match &attrs.default {
            Some(Some(func)) => {
                let func = func.rsplit("::").next().unwrap_or(func);
                let body = self
                    .sources
                    .fns
                    .get(&(file, func.to_owned()))
                    .unwrap_or_else(|| panic!("{at}: default fn {func} not found in its file"));
                match self.sources.eval_block(&body.block, file) {
                    Some(v) => DefaultValue::Value(v),
                    None => DefaultValue::Computed(func.to_owned()),
                }
            }
            _ if optional => DefaultValue::Unset,
            Some(None) => match (&kind, struct_default) {
                (Kind::Array(_) | Kind::Tables(_), _) => DefaultValue::Empty,
                (Kind::Table(_), true) => DefaultValue::Table,
                (Kind::Bool, _) => DefaultValue::Value(Val::Bool(false)),
                (Kind::Int, _) => DefaultValue::Value(Val::Int(0)),
                (Kind::Str, _) => DefaultValue::Value(Val::Str(String::new())),
                (Kind::Enum(_), _) => DefaultValue::Value(
                    self.sources
                        .type_default(&ty_name)
                        .unwrap_or_else(|| panic!("{at}: no default variant of {ty_name}")),
                ),
                _ => panic!(
                    "{at}: #[serde(default)] on a {ty_name}: teach the generator its default"
                ),
            },
            None => DefaultValue::Required,
        };
        Key {
            name,
            kind,
            default,
            doc,
        }
    }

    /// The kind of a (non-`Option`) type, and for a struct whether it has a `Default`.
    fn kind(
        &mut self,
        ty: &Type,
        ty_name: &str,
        attrs: &FieldAttrs,
        path: &[String],
        in_array: bool,
        optional: bool,
    ) -> (Kind, bool) {
        let at = path.join(".");
        let leaf = match ty_name {
            "String" => Some(Kind::Str),
            "Secret" => Some(Kind::Secret),
            "bool" => Some(Kind::Bool),
            "u8" | "u16" | "u32" | "u64" | "usize" => Some(Kind::Int),
            "Duration" => Some(Kind::Duration),
            "ByteSize" => Some(Kind::Size),
            "HostPort" => Some(Kind::HostPort),
            "SocketAddr" => Some(Kind::SocketAddr),
            "PathBuf" => Some(Kind::Path),
            "SiteSelector" => Some(Kind::Sites),
            _ => None,
        };
        if let Some(kind) = leaf {
            return (kind, false);
        }
        if ty_name == "Vec" {
            let inner = type_parts(ty)
                .1
                .unwrap_or_else(|| panic!("{at}: Vec without a type"));
            let inner_name = type_parts(inner).0;
            if let Some((_, TypeItem::Struct(_))) = self.sources.serde_type(&inner_name) {
                let presence = if attrs.default.is_some() {
                    Presence::Optional
                } else {
                    Presence::Required
                };
                let t = self.walk_struct(&inner_name, path, true, true, None, presence, Vec::new());
                return (Kind::Tables(t), false);
            }
            let (inner_kind, _) = self.kind(inner, &inner_name, attrs, path, in_array, false);
            return (Kind::Array(Box::new(inner_kind)), false);
        }
        let Some((_, item)) = self.sources.serde_type(ty_name) else {
            panic!("{at}: type {ty_name} is neither a serde type in shared/src/config nor a known value type: teach the generator how an operator writes it");
        };
        match item {
            TypeItem::Struct(_) => {
                let has_default = self.sources.default_impls.contains_key(ty_name)
                    || derives(&self.sources.types[ty_name].1.attrs(), "Default");
                let presence = match (optional, attrs.default.is_some()) {
                    (true, _) => Presence::Optional,
                    (false, true) => Presence::Defaulted,
                    (false, false) => Presence::Required,
                };
                let t =
                    self.walk_struct(ty_name, path, false, in_array, None, presence, Vec::new());
                (Kind::Table(t), has_default)
            }
            TypeItem::Enum(e) => {
                // Checked for attributes the generator does not know; variant_name applies rename_all.
                container_attrs(&e.attrs, ty_name, &["tag"]);
                let tag = container_value(&e.attrs, "tag");
                let unit = e.variants.iter().all(|v| matches!(v.fields, Fields::Unit));
                if unit && tag.is_none() {
                    let values = e
                        .variants
                        .iter()
                        .map(|v| EnumValue {
                            value: variant_name(&e.attrs, v),
                            aliases: variant_aliases(v),
                            doc: doc_paragraphs(&v.attrs),
                        })
                        .collect();
                    return (Kind::Enum(values), false);
                }
                let Some(tag) = tag else {
                    panic!("{at}: enum {ty_name} has data but no #[serde(tag = ..)]: teach the generator its shape");
                };
                let presence = if optional {
                    Presence::Optional
                } else {
                    Presence::Required
                };
                let mut variants = Vec::new();
                for v in &e.variants {
                    let Fields::Unnamed(f) = &v.fields else {
                        panic!(
                            "{at}: variant {} of {ty_name} is not a newtype around a struct",
                            v.ident
                        );
                    };
                    let inner = type_parts(&f.unnamed[0].ty).0;
                    let value = variant_name(&e.attrs, v);
                    let t = self.walk_struct(
                        &inner,
                        path,
                        false,
                        in_array,
                        Some((tag.clone(), value.clone())),
                        presence,
                        doc_paragraphs(&v.attrs),
                    );
                    variants.push((value, t));
                }
                (Kind::Tagged(tag, variants), false)
            }
        }
    }
}

impl TypeItem {
    fn attrs(&self) -> Vec<Attribute> {
        match self {
            Self::Struct(s) => s.attrs.clone(),
            Self::Enum(e) => e.attrs.clone(),
        }
    }
}

/// The last segment of a type path and its first generic argument (`Option<PathBuf>` → `Option`, `PathBuf`).
fn type_parts(ty: &Type) -> (String, Option<&Type>) {
    let Type::Path(p) = ty else {
        panic!("a config field's type is not a path: teach the generator");
    };
    let last = p.path.segments.last().expect("a type path has a segment");
    let inner = match &last.arguments {
        syn::PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
            syn::GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    };
    (last.ident.to_string(), inner)
}

fn last_ident(path: &syn::Path) -> String {
    path.segments
        .last()
        .map(|s| s.ident.to_string())
        .unwrap_or_default()
}

fn derives(attrs: &[Attribute], name: &str) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("derive"))
        .any(|a| {
            let mut found = false;
            let _ = a.parse_nested_meta(|meta| {
                found |= last_ident(&meta.path) == name;
                Ok(())
            });
            found
        })
}

/// Doc comment paragraphs: lines joined with spaces, blank lines separate paragraphs.
pub(crate) fn doc_paragraphs(attrs: &[Attribute]) -> Vec<String> {
    let mut paragraphs = vec![String::new()];
    for attr in attrs.iter().filter(|a| a.path().is_ident("doc")) {
        let syn::Meta::NameValue(nv) = &attr.meta else {
            continue;
        };
        let Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) = &nv.value
        else {
            continue;
        };
        for line in s.value().lines() {
            let line = line.strip_prefix(' ').unwrap_or(line).trim_end();
            let current = paragraphs.last_mut().expect("never empty");
            if line.is_empty() {
                if !current.is_empty() {
                    paragraphs.push(String::new());
                }
            } else {
                if !current.is_empty() {
                    current.push(' ');
                }
                current.push_str(line);
            }
        }
    }
    paragraphs.retain(|p| !p.is_empty());
    paragraphs
}

/// Every `#[serde(..)]` item as (name, optional string value).
fn serde_items(attrs: &[Attribute]) -> Vec<(String, Option<String>)> {
    let mut items = Vec::new();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            let name = last_ident(&meta.path);
            let value = if meta.input.peek(syn::Token![=]) {
                Some(meta.value()?.parse::<syn::LitStr>()?.value())
            } else {
                None
            };
            items.push((name, value));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("unreadable #[serde] attribute: {e}"));
    }
    items
}

fn field_attrs(attrs: &[Attribute], ty: &str, field: &str) -> FieldAttrs {
    let mut out = FieldAttrs::default();
    for (name, value) in serde_items(attrs) {
        match name.as_str() {
            "default" => out.default = Some(value),
            "with" if value.as_deref() == Some("humantime_serde") => out.humantime = true,
            "rename" => out.rename = value,
            // Accepting numbers for strings (lenient::*) or skipping empty values when writing do not change
            // what an operator writes.
            "deserialize_with" | "skip_serializing_if" => {}
            other => panic!(
                "{ty}.{field}: #[serde({other})] is not understood by the reference generator; teach it (shared/tests/config_reference/schema.rs)"
            ),
        }
    }
    out
}

/// Checks a container's serde attributes against what the generator handles; returns `rename_all`.
fn container_attrs(attrs: &[Attribute], ty: &str, extra_ok: &[&str]) -> Option<String> {
    let mut rename_all = None;
    for (name, value) in serde_items(attrs) {
        match name.as_str() {
            "rename_all" => rename_all = value,
            n if extra_ok.contains(&n) => {}
            other => panic!(
                "{ty}: #[serde({other})] is not understood by the reference generator; teach it (shared/tests/config_reference/schema.rs)"
            ),
        }
    }
    rename_all
}

fn container_flag(attrs: &[Attribute], name: &str) -> bool {
    serde_items(attrs).iter().any(|(n, _)| n == name)
}

fn container_value(attrs: &[Attribute], name: &str) -> Option<String> {
    serde_items(attrs)
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v)
}

fn variant_name(enum_attrs: &[Attribute], v: &syn::Variant) -> String {
    if let Some(name) = container_value(&v.attrs, "rename") {
        return name;
    }
    let rename_all = container_value(enum_attrs, "rename_all");
    let ident = v.ident.to_string();
    match rename_all.as_deref() {
        None => ident,
        Some("kebab-case") => camel_to(&ident, '-'),
        Some("snake_case") => camel_to(&ident, '_'),
        Some("lowercase") => ident.to_lowercase(),
        Some(other) => panic!("rename_all = {other:?} on an enum: teach the generator"),
    }
}

fn variant_aliases(v: &syn::Variant) -> Vec<String> {
    serde_items(&v.attrs)
        .into_iter()
        .filter(|(n, _)| n == "alias")
        .filter_map(|(_, v)| v)
        .collect()
}

fn camel_to(ident: &str, sep: char) -> String {
    let mut out = String::new();
    for (i, c) in ident.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(sep);
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn rename(field: &str, rename_all: Option<&str>) -> String {
    match rename_all {
        None | Some("snake_case") => field.to_owned(),
        Some("kebab-case") => field.replace('_', "-"),
        Some(other) => panic!("rename_all = {other:?} on a struct: teach the generator"),
    }
}
