package issuer

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestOpenAPIRoutes: docs/openapi.yaml is the contract. Every route the
// server serves, with its methods, is in it, and every path and method it
// lists is served. (The fields of the bodies are not compared yet.)
func TestOpenAPIRoutes(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "docs", "openapi.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Paths map[string]map[string]any `yaml:"paths"`
	}
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	spec := map[string][]string{}
	for path, ops := range doc.Paths {
		for m := range ops {
			switch m {
			case "get", "post", "put", "delete", "patch", "head":
				spec[path] = append(spec[path], strings.ToUpper(m))
			}
		}
		slices.Sort(spec[path])
	}
	e := newAPIEnv(t, newIssuer(t, "p256"), filepath.Join(t.TempDir(), "data"), 0)
	served := map[string][]string{}
	for path, ms := range e.api.methods {
		served[path] = slices.Sorted(slices.Values(ms))
	}
	for path, ms := range served {
		if !slices.Equal(spec[path], ms) {
			t.Errorf("%s: served %v, openapi.yaml lists %v", path, ms, spec[path])
		}
	}
	for path, ms := range spec {
		if _, ok := served[path]; !ok {
			t.Errorf("%s %v: in openapi.yaml, not served", path, ms)
		}
	}
}
