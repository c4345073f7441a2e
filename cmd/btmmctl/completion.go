package main

import _ "embed"

// bashCompletion is `btmmctl completion` (also installed by the package).
//
//go:embed btmmctl.bash-completion
var bashCompletion string
