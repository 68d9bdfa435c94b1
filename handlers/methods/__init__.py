"""The explanation methods, one module each, by the name the API uses."""

from handlers.methods import coupled_nmf, gradcam_rules, protofac, protonmf, srae

# name -> (offline fit function, online explainer class)
METHODS = {
    protonmf.NAME: (protonmf.fit, protonmf.ProtoNMFExplainer),
    coupled_nmf.NAME: (coupled_nmf.fit, coupled_nmf.CoupledNMFExplainer),
    srae.NAME: (srae.fit, srae.SRAEExplainer),
    gradcam_rules.NAME: (gradcam_rules.fit, gradcam_rules.GradCAMRulesExplainer),
    protofac.NAME: (protofac.fit, protofac.ProtoFacExplainer),
}
