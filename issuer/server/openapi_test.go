package server

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"blindperso/api"
	"blindperso/batch"
	"blindperso/hsm"
	"blindperso/protocol"
)

// docs/openapi.yaml is the contract: these tests hold the server's
// routes and package api's types equal to it, both ways.

type openAPI struct {
	Paths      map[string]map[string]any `yaml:"paths"`
	Components map[string]map[string]any `yaml:"components"`
}

func readOpenAPI(t *testing.T) openAPI {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "openapi.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc openAPI
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

var httpMethods = []string{"get", "post", "put", "delete", "patch", "head"}

// TestOpenAPIRoutes: every route the server serves, with its methods, is
// in openapi.yaml, and every path and method it lists is served.
func TestOpenAPIRoutes(t *testing.T) {
	doc := readOpenAPI(t)
	spec := map[string][]string{}
	for path, ops := range doc.Paths {
		for m := range ops {
			if slices.Contains(httpMethods, m) {
				spec[path] = append(spec[path], strings.ToUpper(m))
			}
		}
		slices.Sort(spec[path])
	}
	e := newAPIEnv(t, newIssuer(t, hsm.KindP256), filepath.Join(t.TempDir(), "data"), 0)
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

// wire is what each route takes and answers, as package api's types (nil:
// no JSON body). A route without an entry fails TestOpenAPIFields, so a
// new route cannot be served without its types being compared.
var wire = map[string]struct{ in, out any }{
	"GET /healthz":                  {nil, api.Health{}},
	"GET /metrics":                  {nil, nil},               // Prometheus text
	"POST /v1/batches":              {nil, api.BatchDetail{}}, // multipart in
	"GET /v1/batches":               {nil, []api.Batch{}},
	"GET /v1/batches/{id}":          {nil, api.BatchDetail{}},
	"GET /v1/cards":                 {nil, []api.Card{}},
	"GET /v1/cards/{id}":            {nil, api.CardDetail{}},
	"POST /v1/cards/{id}/challenge": {nil, api.Challenge{}},
	"POST /v1/cards/{id}/verify":    {api.VerifyRequest{}, api.VerifyResult{}},
	"POST /v1/cards/{id}/block":     {api.StateChange{}, api.Card{}},
	"POST /v1/cards/{id}/unblock":   {api.StateChange{}, api.Card{}},
}

// TestOpenAPIFields: for every route, the JSON fields of its request and
// its 200 answer in openapi.yaml are those of package api's types, with
// the same JSON kinds, nested objects and array items included; every
// other answer is an Error; the manifest an upload carries is
// batch.Manifest.
func TestOpenAPIFields(t *testing.T) {
	c := &checker{t: t, doc: readOpenAPI(t), errorf: t.Errorf}
	seen := map[string]bool{}
	for path, ops := range c.doc.Paths {
		for m, op := range ops {
			if !slices.Contains(httpMethods, m) {
				continue
			}
			route := strings.ToUpper(m) + " " + path
			seen[route] = true
			w, ok := wire[route]
			if !ok {
				t.Errorf("%s: no entry in wire", route)
				continue
			}
			o := op.(map[string]any)
			rb, _ := o["requestBody"].(map[string]any)
			if in := c.jsonSchema(rb); in != nil || w.in != nil {
				c.compare(route+" request", in, reflect.TypeOf(w.in))
			}
			for code, r := range o["responses"].(map[string]any) {
				out := c.jsonSchema(c.resolve(r.(map[string]any)))
				switch {
				case code != "200":
					c.compare(route+" "+code, out, reflect.TypeOf(api.Error{}))
				case out != nil || w.out != nil:
					c.compare(route+" 200", out, reflect.TypeOf(w.out))
				}
			}
		}
	}
	for route := range wire {
		if !seen[route] {
			t.Errorf("%s: in wire, not in openapi.yaml", route)
		}
	}
	c.compare("manifest", map[string]any{"$ref": "#/components/schemas/Manifest"}, reflect.TypeOf(batch.Manifest{}))
}

// TestOpenAPICompareFindsDrift: the comparison finds a field renamed on
// one side, and nothing where there is nothing.
func TestOpenAPICompareFindsDrift(t *testing.T) {
	type renamed struct {
		Result string `json:"result"`
		Failed int    `json:"failed"`
	}
	var got strings.Builder
	c := &checker{t: t, doc: readOpenAPI(t), errorf: func(f string, a ...any) { fmt.Fprintf(&got, f+"\n", a...) }}
	ref := map[string]any{"$ref": "#/components/schemas/VerifyResult"}
	c.compare("drift", ref, reflect.TypeOf(renamed{}))
	if !strings.Contains(got.String(), "[failed]") || !strings.Contains(got.String(), "[failed_auth]") {
		t.Errorf("a renamed field was not found: %q", got.String())
	}
	got.Reset()
	c.compare("same", ref, reflect.TypeOf(api.VerifyResult{}))
	if got.Len() != 0 {
		t.Errorf("api.VerifyResult: %s", got.String())
	}
}

type checker struct {
	t      *testing.T
	doc    openAPI
	errorf func(format string, args ...any)
}

// resolve follows a $ref into components.
func (c *checker) resolve(m map[string]any) map[string]any {
	for {
		ref, ok := m["$ref"].(string)
		if !ok {
			return m
		}
		parts := strings.Split(strings.TrimPrefix(ref, "#/components/"), "/")
		next, ok := c.doc.Components[parts[0]][parts[1]].(map[string]any)
		if !ok {
			c.t.Fatalf("%s: not in components", ref)
		}
		m = next
	}
}

// jsonSchema is the application/json schema of a request body or an
// answer, nil if it has none.
func (c *checker) jsonSchema(m map[string]any) map[string]any {
	ct, _ := m["content"].(map[string]any)
	j, _ := ct["application/json"].(map[string]any)
	s, _ := j["schema"].(map[string]any)
	return s
}

// flatten resolves s and merges an allOf into one object schema.
func (c *checker) flatten(s map[string]any) map[string]any {
	s = c.resolve(s)
	all, ok := s["allOf"].([]any)
	if !ok {
		return s
	}
	props := map[string]any{}
	for _, p := range all {
		pp, _ := c.flatten(p.(map[string]any))["properties"].(map[string]any)
		for k, v := range pp {
			props[k] = v
		}
	}
	return map[string]any{"type": "object", "properties": props}
}

var (
	typeTime = reflect.TypeOf(time.Time{})
	typeHex  = reflect.TypeOf(protocol.Hex{})
	typeRaw  = reflect.TypeOf(json.RawMessage{})
)

// jsonKind is the JSON type a Go type encodes as.
func jsonKind(typ reflect.Type) string {
	switch {
	case typ == typeTime || typ == typeHex || typ.Kind() == reflect.String:
		return "string"
	case typ == typeRaw: // the station's manifest, compared on its own
		return "object"
	case typ.Kind() == reflect.Int || typ.Kind() == reflect.Int64 || typ.Kind() == reflect.Uint:
		return "integer"
	case typ.Kind() == reflect.Bool:
		return "boolean"
	case typ.Kind() == reflect.Slice:
		return "array"
	case typ.Kind() == reflect.Struct:
		return "object"
	}
	return typ.String()
}

// compare reports where schema s and Go type typ disagree.
func (c *checker) compare(where string, s map[string]any, typ reflect.Type) {
	switch {
	case s == nil && typ == nil:
		return
	case s == nil:
		c.errorf("%s: answers %v, openapi.yaml has no JSON schema", where, typ)
		return
	case typ == nil:
		c.errorf("%s: openapi.yaml has a JSON schema, the server none", where)
		return
	}
	s = c.flatten(s)
	if kind, _ := s["type"].(string); kind != jsonKind(typ) {
		c.errorf("%s: openapi.yaml says %q, %v is %q in JSON", where, kind, typ, jsonKind(typ))
		return
	}
	switch {
	case typ == typeRaw || typ == typeTime || typ == typeHex:
	case typ.Kind() == reflect.Slice:
		items, _ := s["items"].(map[string]any)
		c.compare(where+"[]", items, typ.Elem())
	case typ.Kind() == reflect.Struct:
		props, _ := s["properties"].(map[string]any)
		fields := jsonFields(typ)
		var missing, extra []string
		for name, f := range fields {
			if ps, ok := props[name].(map[string]any); ok {
				c.compare(where+"."+name, ps, f)
			} else {
				missing = append(missing, name)
			}
		}
		for name := range props {
			if _, ok := fields[name]; !ok {
				extra = append(extra, name)
			}
		}
		sort.Strings(missing)
		sort.Strings(extra)
		if len(missing) > 0 {
			c.errorf("%s: %v has fields %v that openapi.yaml does not list", where, typ, missing)
		}
		if len(extra) > 0 {
			c.errorf("%s: openapi.yaml lists %v, which %v does not have", where, extra, typ)
		}
	}
}

// jsonFields are the JSON names of a struct's fields and their types,
// embedded structs' flattened as encoding/json does.
func jsonFields(typ reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range typ.NumField() {
		f := typ.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" || !f.IsExported() {
			continue
		}
		if f.Anonymous && tag == "" {
			for k, v := range jsonFields(f.Type) {
				out[k] = v
			}
			continue
		}
		name, _, _ := strings.Cut(tag, ",")
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}
