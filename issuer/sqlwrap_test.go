package issuer

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"
)

// TestSQLThroughWrappers: outside sqlStore's exec, queryRow and query
// (which rewrite placeholders for the dialect) and the statement cache
// they feed, no code of this package runs SQL directly, so no statement
// can forget the rewrite — which breaks PostgreSQL only.
func TestSQLThroughWrappers(t *testing.T) {
	allowed := map[string]bool{"exec": true, "queryRow": true, "query": true, "stmt": true, "ExecContext": true, "QueryRowContext": true}
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
