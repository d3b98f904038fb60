"""The `clusterctl-tui` command: the one place that knows both the runtime and the console.

`runtime` is the engine and `console` the Textual app on top of it; this
package sits above both (an import-linter contract keeps the layers), so
`runtime.cli` never imports the console: it is handed the two entry points
that need it, the interactive primary and `attach`.
"""
