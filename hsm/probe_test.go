package hsm

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// What the brief measured on Debian 12 (SoftHSM2 2.6.1, NSS 3.87), and
// what the probe must therefore find.
var probeWant = map[string]struct {
	runnable []string
	missing  map[string][]string // profile → missing capabilities, in order
	byTrial  map[string][]string
	exponent int
	trusted  bool
}{
	"SoftHSM2": {
		runnable: []string{"rsa-oaep-aes", "ecdh-p256-aes"},
		missing: map[string][]string{
			"rsa-raw-sha1":   {"CKM_RSA_X_509 unwrap", "CKM_CONCATENATE_BASE_AND_DATA", "CKM_SHA1_KEY_DERIVATION"},
			"rsa-oaep-sha1":  {"CKM_CONCATENATE_BASE_AND_DATA", "CKM_SHA1_KEY_DERIVATION"},
			"ecdh-p256-x963": {"CKM_ECDH1_DERIVE with CKD_SHA1_KDF"},
			// DESIGN.md §11: SoftHSM2 2.6.1 answers 0x70 to SP 800-108.
			"rsa-oaep-kbkdf":  {"CKM_SP800_108_COUNTER_KDF"},
			"ecdh-p256-kbkdf": {"CKM_SP800_108_COUNTER_KDF"},
		},
		exponent: 3,
		trusted:  true,
	},
	"NSS": {
		runnable: []string{"rsa-raw-sha1", "rsa-oaep-sha1", "rsa-oaep-aes", "ecdh-p256-x963", "ecdh-p256-aes",
			"rsa-oaep-kbkdf", "ecdh-p256-kbkdf"},
		// The "NSS Certificate DB" slot does these without listing them.
		byTrial: map[string][]string{
			"rsa-raw-sha1":  {"CKM_CONCATENATE_BASE_AND_DATA", "CKM_SHA1_KEY_DERIVATION"},
			"rsa-oaep-sha1": {"CKM_CONCATENATE_BASE_AND_DATA", "CKM_SHA1_KEY_DERIVATION"},
			"rsa-oaep-aes":  {"CKM_AES_ECB_ENCRYPT_DATA"},
			"ecdh-p256-aes": {"CKM_AES_ECB_ENCRYPT_DATA"},
		},
		exponent: 65537,
	},
}

func TestProbe(t *testing.T) {
	for name, tok := range openBoth(t, 1) {
		t.Run(name, func(t *testing.T) {
			want := probeWant[name]
			r, err := tok.Probe(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			var runnable []string
			for _, p := range r.Profiles {
				if p.Runnable {
					runnable = append(runnable, p.Profile)
				}
				if !slices.Equal(p.Missing, want.missing[p.Profile]) {
					t.Errorf("%s: missing %q, want %q", p.Profile, p.Missing, want.missing[p.Profile])
				}
				if !slices.Equal(p.ByTrial, want.byTrial[p.Profile]) {
					t.Errorf("%s: by trial %q, want %q", p.Profile, p.ByTrial, want.byTrial[p.Profile])
				}
			}
			if !slices.Equal(runnable, want.runnable) {
				t.Errorf("runnable %q, want %q", runnable, want.runnable)
			}
			if r.RSAExponent != want.exponent {
				t.Errorf("RSA exponent %d, want %d", r.RSAExponent, want.exponent)
			}
			if r.WrapWithTrusted != want.trusted {
				t.Errorf("CKA_WRAP_WITH_TRUSTED enforced = %v, want %v (%s)", r.WrapWithTrusted, want.trusted, r.WrapWithTrustedDetail)
			}
			if !r.KeyWrapVerified {
				t.Errorf("RFC 5649 wrap %s not verified", r.KeyWrap)
			}
			// The table agrees with the trials.
			for _, n := range r.Notes {
				if strings.Contains(n, "fix") || strings.Contains(n, "trial failed") {
					t.Errorf("note: %s", n)
				}
			}
			var text bytes.Buffer
			if err := r.WriteText(&text); err != nil {
				t.Fatal(err)
			}
			for _, p := range r.Profiles {
				if !strings.Contains(text.String(), p.Profile+"  ") || !strings.Contains(text.String(), p.Verdict()) {
					t.Errorf("text output lacks %s: %s", p.Profile, p.Verdict())
				}
			}
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			var back ProbeReport
			if err := json.Unmarshal(b, &back); err != nil || len(back.Profiles) != len(protocol.Profiles()) {
				t.Errorf("JSON round trip: %v, %d profiles", err, len(back.Profiles))
			}
			// Every throwaway object is gone.
			err = tok.With(context.Background(), func(s Session) error {
				hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false)}, 10)
				if len(hs) != 0 {
					t.Errorf("%d session objects left after the probe", len(hs))
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestVerdict(t *testing.T) {
	for _, tc := range []struct {
		r    ProfileResult
		want string
	}{
		{ProfileResult{Runnable: true}, "runnable"},
		{ProfileResult{Runnable: true, ByTrial: []string{"CKM_A", "CKM_B"}}, "runnable (by trial; not in mechanism list: CKM_A, CKM_B)"},
		{ProfileResult{Missing: []string{"CKM_A unwrap", "CKM_B"}}, "not runnable: missing CKM_A unwrap, CKM_B"},
	} {
		if got := tc.r.Verdict(); got != tc.want {
			t.Errorf("Verdict(%+v) = %q, want %q", tc.r, got, tc.want)
		}
	}
}
