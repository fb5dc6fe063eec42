package issuer

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSQLThroughWrappers: outside sqlStore's exec, queryRow and query
// (which rewrite placeholders for the dialect) and the statement cache
// they feed, no code of this package runs SQL directly, so no statement
// can forget the rewrite — which breaks PostgreSQL only.
func TestSQLThroughWrappers(t *testing.T) {
	// The statement caches' own methods (stmtCache, stmtPool's pooled, authReader) run what the
	// wrappers hand them, already rewritten.
	allowed := map[string]bool{"exec": true, "queryRow": true, "query": true, "stmt": true,
		"ExecContext": true, "QueryRowContext": true, "QueryContext": true}
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range file.Decls {
			fn, ok := d.(*ast.FuncDecl)
			if !ok || fn.Body == nil || allowed[fn.Name.Name] {
				continue
			}
			ast.Inspect(fn.Body, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				if sel, ok := call.Fun.(*ast.SelectorExpr); ok {
					switch sel.Sel.Name {
					case "ExecContext", "QueryContext", "QueryRowContext", "PrepareContext":
						t.Errorf("%s: %s calls %s directly: use s.exec, s.queryRow or s.query", fset.Position(call.Pos()), fn.Name.Name, sel.Sel.Name)
					}
				}
				return true
			})
		}
	}
}

// TestTimeTextSorts: the store's time text sorts as the times do.
func TestTimeTextSorts(t *testing.T) {
	base := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	ts := []time.Time{base, base.Add(100 * time.Millisecond), base.Add(time.Second), base.Add(time.Second + time.Nanosecond)}
	for i := 1; i < len(ts); i++ {
		a, b := formatTime(ts[i-1]), formatTime(ts[i])
		if a >= b {
			t.Errorf("%s sorts after %s", a, b)
		}
		if !parseTime(b).Equal(ts[i]) {
			t.Errorf("%s reads back as %v", b, parseTime(b))
		}
	}
	// The RFC3339Nano text of earlier versions is still read.
	if !parseTime(base.Format(time.RFC3339Nano)).Equal(base) {
		t.Error("RFC3339Nano text not read")
	}
}

// TestClassify: the one classification of the issuer's errors, as the API
// and the CLI answer them, through the wrapping the store adds.
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err        error
		kind       Kind
		http, exit int
	}{
		{fmt.Errorf("store: card 01: %w", ErrNotFound), KindNotFound, 404, 3},
		{fmt.Errorf("card 01 is blocked: %w", ErrCardNotActive), KindConflict, 409, 4},
		{fmt.Errorf("card 01 is active, not blocked: %w", ErrCardNotBlocked), KindConflict, 409, 4},
		{fmt.Errorf("import: %w", &BatchRefusedError{Path: "b", Reason: "size differs"}), KindRefused, 422, 5},
		{errors.New("disk full"), KindInternal, 500, 1},
	} {
		k, title := Classify(tc.err)
		if k != tc.kind || k.HTTPStatus() != tc.http || k.ExitCode() != tc.exit || title == "" {
			t.Errorf("%v: kind %d %q, HTTP %d, exit %d", tc.err, k, title, k.HTTPStatus(), k.ExitCode())
		}
	}
}
