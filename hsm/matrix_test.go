package hsm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// The compatibility matrix of docs/HSM.md (between <!-- matrix --> and
// <!-- /matrix -->): profile × token. The measured columns are what
// `issuer probe` finds on the real tokens, now; the published ones are
// the vendor rows of hsm/vendors.go; the last row is each table's open
// PIN-holder paths (package pinholder's TestMatrixMatchesTable holds the
// table equal to the adversary). TestCompatibilityMatrix fails when the
// document and the tokens (or the tables) disagree; BLINDPERSO_PRINT_MATRIX=1
// prints the table the tokens give.

// matrixMeasured are the measured columns: name → how to get the token.
var matrixMeasured = []struct {
	name string
	open func(testing.TB) hsmtest.Token
}{
	{"SoftHSM2", hsmtest.SoftHSM},
	{"NSS softokn", hsmtest.NSS},
	{"opencryptoki", hsmtest.OpenCryptoki},
}

// matrixPublished are the published columns: name → table key.
var matrixPublished = []struct{ name, key string }{
	{"Luna 7", "luna7"}, {"nShield 5", "nshield5"}, {"CloudHSM 5", "cloudhsm5"},
	{"Utimaco", "utimaco"}, {"YubiHSM 2", "yubihsm2"}, {"Cloud KMS", "gcpkms"},
}

const matrixPINRow = "PIN holder: open ways out"

func measuredCell(r ProfileResult) string {
	switch {
	case !r.Runnable:
		return "missing " + strings.Join(r.Missing, ", ")
	case len(r.ByTrial) > 0:
		return "runs (by trial)"
	}
	return "runs"
}

func publishedCell(m *Mechanisms, profile string) string {
	if m.Unsuitable != "" {
		return "refused"
	}
	c, ok := m.Claim(profile)
	if !ok {
		return "unknown*"
	}
	return string(c.Verdict) + "*"
}

func pinCell(m *Mechanisms) string {
	switch {
	case m.OpenPaths == nil:
		return "not measured"
	case len(m.OpenPaths) == 0:
		return "none"
	}
	return fmt.Sprintf("%d: %s", len(m.OpenPaths), strings.Join(m.OpenPaths, ", "))
}

func TestCompatibilityMatrix(t *testing.T) {
	ctx := context.Background()
	got := map[string]map[string]string{} // row → column → cell
	set := func(row, col, cell string) {
		if got[row] == nil {
			got[row] = map[string]string{}
		}
		got[row][col] = cell
	}
	var cols []string
	skipped := map[string]string{}
	for _, c := range matrixMeasured {
		cols = append(cols, c.name)
		var ht hsmtest.Token
		ok := t.Run(c.name, func(t *testing.T) { ht = c.open(t) })
		if !ok || ht.Module == "" {
			skipped[c.name] = "no token here"
			continue
		}
		tok, err := OpenURI(ht.URI, 1)
		if err != nil {
			t.Fatalf("open %s: %v", c.name, err)
		}
		r, err := tok.Probe(ctx)
		pc := pinCell(tok.Mechanisms())
		tok.Close()
		if err != nil {
			t.Fatalf("probe %s: %v", c.name, err)
		}
		for _, p := range r.Profiles {
			set(p.Profile, c.name, measuredCell(p))
		}
		set(matrixPINRow, c.name, pc)
	}
	for _, c := range matrixPublished {
		cols = append(cols, c.name)
		m, err := TableByName(c.key)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range protocol.Profiles() {
			set(p.Name, c.name, publishedCell(m, p.Name))
		}
		set(matrixPINRow, c.name, pinCell(m))
	}
	rows := []string{}
	for _, p := range protocol.Profiles() {
		rows = append(rows, p.Name)
	}
	rows = append(rows, matrixPINRow)
	if os.Getenv("BLINDPERSO_PRINT_MATRIX") != "" {
		fmt.Printf("| profile | %s |\n|---%s|\n", strings.Join(cols, " | "), strings.Repeat("|---", len(cols)))
		for _, r := range rows {
			line := []string{r}
			for _, c := range cols {
				line = append(line, got[r][c])
			}
			fmt.Printf("| %s |\n", strings.Join(line, " | "))
		}
	}
	doc := docMatrix(t)
	if strings.Join(doc.cols, "|") != strings.Join(cols, "|") {
		t.Fatalf("docs/HSM.md matrix columns %v, want %v", doc.cols, cols)
	}
	for _, r := range rows {
		for _, c := range cols {
			if skipped[c] != "" {
				continue
			}
			want, ok := doc.cells[r][c]
			switch {
			case !ok:
				t.Errorf("docs/HSM.md matrix has no cell for %s on %s", r, c)
			case want != got[r][c]:
				t.Errorf("%s on %s: the token (or its table) says %q, docs/HSM.md says %q", r, c, got[r][c], want)
			}
		}
	}
	if len(doc.cells) != len(rows) {
		t.Errorf("docs/HSM.md matrix has %d rows, want %d (%v)", len(doc.cells), len(rows), rows)
	}
	for c, why := range skipped {
		t.Logf("column %s not compared: %s", c, why)
	}
}

type matrixDoc struct {
	cols  []string
	cells map[string]map[string]string
}

func docMatrix(t *testing.T) matrixDoc {
	b, err := os.ReadFile(filepath.Join("..", "docs", "HSM.md"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i, j := strings.Index(s, "<!-- matrix -->"), strings.Index(s, "<!-- /matrix -->")
	if i < 0 || j < i {
		t.Fatal("docs/HSM.md has no <!-- matrix --> table")
	}
	d := matrixDoc{cells: map[string]map[string]string{}}
	var header []string
	for _, line := range strings.Split(strings.TrimSpace(s[i+len("<!-- matrix -->"):j]), "\n") {
		cells := strings.Split(strings.Trim(strings.TrimSpace(line), "|"), "|")
		for k := range cells {
			cells[k] = strings.TrimSpace(cells[k])
		}
		switch {
		case header == nil:
			header = cells
			d.cols = cells[1:]
		case strings.HasPrefix(cells[0], "---"):
		default:
			row := map[string]string{}
			for k := 1; k < len(cells) && k < len(header); k++ {
				row[header[k]] = cells[k]
			}
			d.cells[cells[0]] = row
		}
	}
	return d
}
