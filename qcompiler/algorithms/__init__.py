"""Weight algorithms: GPTQ, AWQ, and the registry (``registry``) that dispatches on a recipe's spec type.
A new algorithm is one module here (or outside the package) that registers itself."""
