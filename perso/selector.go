package perso

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Environment variables that select readers when no flag does, in the
// manner of GlobalPlatformPro's GP_READER and pySim's --pcsc-regex.
const (
	EnvReaders     = "BLINDPERSO_READERS"      // same syntax as --readers
	EnvReaderRegex = "BLINDPERSO_READER_REGEX" // same as --reader-regex
)

// Selector picks readers by index (position in pcscd's list), exact name
// or regular expression. A reader is selected if any criterion matches;
// the zero Selector selects every reader.
type Selector struct {
	Indices []int
	Names   []string
	Regex   *regexp.Regexp
}

// ParseSelector reads a --readers list (each item an index or an exact
// name) and a --reader-regex. Empty means every reader.
func ParseSelector(items []string, regex string) (Selector, error) {
	var s Selector
	for _, it := range items {
		it = strings.TrimSpace(it)
		if it == "" {
			continue
		}
		if n, err := strconv.Atoi(it); err == nil {
			if n < 0 {
				return s, fmt.Errorf("reader index %d is negative", n)
			}
			s.Indices = append(s.Indices, n)
			continue
		}
		s.Names = append(s.Names, it)
	}
	if regex != "" {
		re, err := regexp.Compile(regex)
		if err != nil {
			return s, fmt.Errorf("reader regex %q: %w", regex, err)
		}
		s.Regex = re
	}
	return s, nil
}

// All reports whether every reader is selected.
func (s Selector) All() bool { return len(s.Indices) == 0 && len(s.Names) == 0 && s.Regex == nil }

// Filter returns the selected readers of names, in order.
func (s Selector) Filter(names []string) []string {
	var out []string
	for i, n := range names {
		if s.All() || slices.Contains(s.Indices, i) || slices.Contains(s.Names, n) ||
			(s.Regex != nil && s.Regex.MatchString(n)) {
			out = append(out, n)
		}
	}
	return out
}

// String describes the selection for logs.
func (s Selector) String() string {
	if s.All() {
		return "all readers"
	}
	var parts []string
	for _, i := range s.Indices {
		parts = append(parts, "#"+strconv.Itoa(i))
	}
	for _, n := range s.Names {
		parts = append(parts, strconv.Quote(n))
	}
	if s.Regex != nil {
		parts = append(parts, "/"+s.Regex.String()+"/")
	}
	return strings.Join(parts, ", ")
}
