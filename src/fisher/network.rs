//! Network Fisher forms and results (per-layer blocks, KFAC factors, F·v).

use ndarray::{Array1, Array2};

/// What to reduce a network's per-sample gradients to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetForm {
    /// F (P×P).
    Full,
    /// diag(F) (P).
    Diagonal,
    /// Per-layer diagonal blocks (P_l×P_l, weight then bias).
    Layer,
    /// KFAC factors per layer.
    Kfac,
    /// The square-root factor rows (N·R × P) with F = GᵀG/N; N×P for `empirical`.
    Grads,
    /// Per-sample E_y‖gᵢ‖² (N), computed without forming gradients.
    Norms,
}

impl NetForm {
    /// Every form, in the order `--help` lists them.
    pub const ALL: [NetForm; 6] =
        [NetForm::Full, NetForm::Diagonal, NetForm::Layer, NetForm::Kfac, NetForm::Grads, NetForm::Norms];

    /// The command-line spelling (also the `form` metadata of a result file).
    pub fn name(self) -> &'static str {
        match self {
            NetForm::Full => "full",
            NetForm::Diagonal => "diag",
            NetForm::Layer => "layer",
            NetForm::Kfac => "kfac",
            NetForm::Grads => "grads",
            NetForm::Norms => "norms",
        }
    }

    /// `name: what it is`, for reports.
    pub fn description(self) -> &'static str {
        match self {
            NetForm::Full => "full: the Fisher matrix F (P×P)",
            NetForm::Diagonal => "diag: the diagonal of F",
            NetForm::Layer => "layer: one diagonal block of F per Linear layer",
            NetForm::Kfac => "kfac: per-layer KFAC factors A and G (block ≈ G ⊗ A in [W|b] order)",
            NetForm::Grads => "grads: per-sample gradient rows G with F = GᵀG/N",
            NetForm::Norms => "norms: per-sample squared gradient norms (their mean is tr F)",
        }
    }
}

impl std::fmt::Display for NetForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for NetForm {
    type Err = crate::FisherError;
    fn from_str(text: &str) -> crate::Result<NetForm> {
        NetForm::ALL.into_iter().find(|f| f.name() == text).ok_or_else(|| {
            crate::FisherError::InvalidInput(format!(
                "unknown form '{text}' (expected full, diag, layer, kfac, grads or norms)"
            ))
        })
    }
}

/// KFAC factors of one layer.
///
/// `a` = (1/N) Σᵢ ãᵢ ãᵢᵀ over the augmented inputs ã = [a; 1] ((in+1)², or in² without bias);
/// `g` = (1/N) Σᵢ Σ_r δ_ir δ_irᵀ over the output rows' pre-activation gradients (out²).
/// The layer's Fisher block is approximated by `g ⊗ a` in the row-major order of the
/// augmented matrix [W | b] (index o·(in+1) + i); see [`crate::fisher::kfac_expand`] for the permutation to
/// PyTorch order (weight row-major, then bias).
#[derive(Debug, Clone, PartialEq)]
pub struct KfacFactors<T = f32> {
    /// Input factor.
    pub a: Array2<T>,
    /// Output-gradient factor.
    pub g: Array2<T>,
}

/// A network Fisher result.
#[derive(Debug, Clone, PartialEq)]
pub enum NetFisher<T = f32> {
    /// F.
    Full(Array2<T>),
    /// diag(F).
    Diagonal(Array1<T>),
    /// Per-layer blocks.
    Layer(Vec<Array2<T>>),
    /// Per-layer KFAC factors.
    Kfac(Vec<KfacFactors<T>>),
    /// Square-root factor rows.
    Grads(Array2<T>),
    /// Per-sample squared norms.
    Norms(Array1<T>),
}

impl<T: Copy + Into<f64>> NetFisher<T> {
    /// The form of this result.
    pub fn form(&self) -> NetForm {
        match self {
            NetFisher::Full(_) => NetForm::Full,
            NetFisher::Diagonal(_) => NetForm::Diagonal,
            NetFisher::Layer(_) => NetForm::Layer,
            NetFisher::Kfac(_) => NetForm::Kfac,
            NetFisher::Grads(_) => NetForm::Grads,
            NetFisher::Norms(_) => NetForm::Norms,
        }
    }

    /// The form's name as used on the command line ([`NetForm::name`]).
    pub fn form_name(&self) -> &'static str {
        self.form().name()
    }

    /// Every stored value in a fixed order (for comparisons).
    pub fn values(&self) -> Vec<f64> {
        match self {
            NetFisher::Full(m) | NetFisher::Grads(m) => m.iter().map(|&v| v.into()).collect(),
            NetFisher::Diagonal(d) | NetFisher::Norms(d) => d.iter().map(|&v| v.into()).collect(),
            NetFisher::Layer(blocks) => blocks.iter().flat_map(|b| b.iter().map(|&v| v.into())).collect(),
            NetFisher::Kfac(factors) => factors
                .iter()
                .flat_map(|f| f.a.iter().chain(f.g.iter()).map(|&v| v.into()))
                .collect(),
        }
    }

    /// tr F for full, diag and layer; the mean of the norms (which equals tr F) for norms;
    /// Σ_l tr(G_l)·tr(A_l), the trace of the KFAC approximation, for kfac; and for grads
    /// Σ‖row‖² / rows, which is tr F only when there is one row per sample (`empirical`).
    pub fn trace(&self) -> f64 {
        let tr = |m: &Array2<T>| m.diag().iter().map(|&v| v.into()).sum::<f64>();
        match self {
            NetFisher::Full(m) => tr(m),
            NetFisher::Diagonal(d) => d.iter().map(|&v| v.into()).sum(),
            NetFisher::Layer(blocks) => blocks.iter().map(tr).sum(),
            NetFisher::Kfac(factors) => factors.iter().map(|f| tr(&f.a) * tr(&f.g)).sum(),
            NetFisher::Grads(g) => g.iter().map(|&v| v.into().powi(2)).sum::<f64>() / g.nrows().max(1) as f64,
            NetFisher::Norms(n) => n.iter().map(|&v| v.into()).sum::<f64>() / n.len().max(1) as f64,
        }
    }

    /// Compares against a reference of the same form (scale-free measures, see
    /// [`crate::fisher::Agreement`]).
    pub fn agreement<U: Copy + Into<f64>>(&self, reference: &NetFisher<U>) -> crate::Result<crate::fisher::Agreement> {
        let (a, b) = (self.values(), reference.values());
        if self.form_name() != reference.form_name() || a.len() != b.len() {
            return Err(crate::FisherError::InvalidInput(format!(
                "cannot compare {} ({} values) with {} ({} values)",
                self.form_name(),
                a.len(),
                reference.form_name(),
                b.len()
            )));
        }
        Ok(crate::fisher::agreement_of(&a, &b))
    }
}

/// Result of an implicit Fisher–vector product.
#[derive(Debug, Clone, PartialEq)]
pub struct Fvp {
    /// F·v in θ order (`None` when only the quadratic form was asked for).
    pub product: Option<Array1<f32>>,
    /// vᵀ F v, accumulated in f64.
    pub quadratic: f64,
}
