"""The explanation methods, one module each, by the name the API uses."""

from handlers.methods import protonmf

# name -> (offline fit function, online explainer class)
METHODS = {
    protonmf.NAME: (protonmf.fit, protonmf.ProtoNMFExplainer),
}
