package hsm

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestNoKeyValueOnTheHost scans the issuer's code (every non-test Go file
// under hsm/ and issuer/) and fails on any path that could bring key
// material to the host or push it into the token:
//
//   - the identifier CKA_VALUE anywhere (reading it is how a key leaves a
//     token; setting it in a template is how a host key enters one) —
//     CKA_VALUE_LEN, the length, is fine;
//   - a pkcs11.NewAttribute whose type is the literal 0x11 (CKA_VALUE by
//     number);
//   - any C_Decrypt family call (Decrypt, DecryptInit, DecryptUpdate,
//     DecryptFinal, DecryptDigestUpdate, DecryptVerifyUpdate): S is
//     unwrapped or derived into a token object, never decrypted.
//
// It reads the syntax tree, so comments that name these things (to forbid
// them) do not count. Tests may import TEST keys and are not scanned.
func TestNoKeyValueOnTheHost(t *testing.T) {
	var files []string
	for _, dir := range []string{".", filepath.Join("..", "issuer")} {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() && strings.HasSuffix(path, ".go") && !strings.HasSuffix(path, "_test.go") {
				files = append(files, path)
			}
			return nil
		})
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
	}
	if len(files) == 0 {
		t.Fatal("no files scanned")
	}
	for _, f := range files {
		for _, v := range scanForKeyValue(t, f) {
			t.Errorf("%s: %s", f, v)
		}
	}
}

var decryptCalls = map[string]bool{
	"Decrypt": true, "DecryptInit": true, "DecryptUpdate": true, "DecryptFinal": true,
	"DecryptDigestUpdate": true, "DecryptVerifyUpdate": true,
}

func scanForKeyValue(tb testing.TB, path string) []string {
	tb.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
	if err != nil {
		tb.Fatal(err)
	}
	var found []string
	at := func(n ast.Node, what string) {
		found = append(found, fset.Position(n.Pos()).String()+": "+what)
	}
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.Ident:
			if n.Name == "CKA_VALUE" {
				at(n, "uses CKA_VALUE")
			}
		case *ast.CallExpr:
			if sel, ok := n.Fun.(*ast.SelectorExpr); ok {
				if decryptCalls[sel.Sel.Name] {
					at(n, "calls "+sel.Sel.Name)
				}
				if sel.Sel.Name == "NewAttribute" && len(n.Args) > 0 {
					if lit, ok := n.Args[0].(*ast.BasicLit); ok && lit.Kind == token.INT {
						if v, err := strconv.ParseUint(lit.Value, 0, 64); err == nil && v == 0x11 {
							at(n, "makes a CKA_VALUE attribute by number")
						}
					}
				}
			}
		}
		return true
	})
	return found
}

// TestScanFindsKeyValue makes sure the scan is not vacuous: it must flag
// each forbidden form in a sample.
func TestScanFindsKeyValue(t *testing.T) {
	sample := `package x
func f() {
	p.GetAttributeValue(h, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	p.DecryptInit(h, m, k)
	p.Decrypt(h, c)
	pkcs11.NewAttribute(0x11, nil)
	pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil) // fine
}
`
	path := filepath.Join(t.TempDir(), "x.go")
	if err := os.WriteFile(path, []byte(sample), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := scanForKeyValue(t, path); len(got) != 4 {
		t.Errorf("the scan found %d forbidden forms, want 4: %q", len(got), got)
	}
}
