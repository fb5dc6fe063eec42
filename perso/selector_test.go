package perso_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"blindperso/perso"
)

func TestSelector(t *testing.T) {
	readers := []string{"Virtual PCD 00 00", "Virtual PCD 00 01", "OMNIKEY 5422 (1)", "OMNIKEY 5422 (2)"}
	for _, tc := range []struct {
		name  string
		items []string
		regex string
		want  []string
	}{
		{"default all", nil, "", readers},
		{"index", []string{"1"}, "", readers[1:2]},
		{"indices and name", []string{"0", "OMNIKEY 5422 (2)"}, "", []string{readers[0], readers[3]}},
		{"regex", nil, `^OMNIKEY`, readers[2:]},
		{"index out of range", []string{"9"}, "", nil},
		{"union", []string{"0"}, `\(2\)$`, []string{readers[0], readers[3]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := perso.ParseSelector(tc.items, tc.regex)
			if err != nil {
				t.Fatal(err)
			}
			if got := s.Filter(readers); !slices.Equal(got, tc.want) {
				t.Errorf("Filter = %q, want %q", got, tc.want)
			}
		})
	}
	if _, err := perso.ParseSelector([]string{"-1"}, ""); err == nil {
		t.Error("negative index accepted")
	}
	if _, err := perso.ParseSelector(nil, "("); err == nil {
		t.Error("bad regex accepted")
	}
}

// The progress display shows counts, readers and the last errors.
func TestStatsRender(t *testing.T) {
	s := perso.NewStats()
	s.SetReader("r0", "working")
	s.Card("r0", "b101", "personalized")
	s.Card("r1", "b102", "skipped")
	s.Error("r1", errors.New("card B103: PERSONALIZE: 6A80"))
	var b strings.Builder
	n := s.Render(&b, 10)
	out := b.String()
	for _, want := range []string{"1/10 locked", "1 skipped", "1 errors", "r0", "working", "b101 personalized", "6A80"} {
		if !strings.Contains(out, want) {
			t.Errorf("display lacks %q:\n%s", want, out)
		}
	}
	if n != strings.Count(out, "\n") {
		t.Errorf("Render returned %d lines for %d", n, strings.Count(out, "\n"))
	}
}

// Off a terminal the display writes one plain summary line per change of
// the counters, without cursor movements.
func TestProgressPlain(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "progress"))
	if err != nil {
		t.Fatal(err)
	}
	s := perso.NewStats()
	p := perso.StartProgress(f, s, 2)
	s.Card("r0", "b101", "personalized")
	s.Card("r1", "b102", "personalized")
	p.Stop()
	f.Close()
	out, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "\x1b") {
		t.Errorf("escape codes in plain progress: %q", out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if !strings.Contains(lines[len(lines)-1], "2/2 locked") {
		t.Errorf("last line %q, want the final count 2/2", lines[len(lines)-1])
	}
	for i := 1; i < len(lines); i++ {
		if lines[i] == lines[i-1] {
			t.Errorf("line repeated: %q", lines[i])
		}
	}
}
