package hsm

import (
	"testing"

	"github.com/miekg/pkcs11"
)

func TestMechanismsFor(t *testing.T) {
	for _, tc := range []struct {
		manufacturer, model string
		name                string
		wrap                uint
		exponent            int
		trusted             bool
	}{
		{"SoftHSM project", "SoftHSM v2", "SoftHSM2", 0x210A, 3, true},
		{"Mozilla Foundation", "NSS 3", "NSS softokn", 0x210B, 65537, false},
		// Not a string any Luna is published to report: generic.
		{"Thales", "Luna K7", "generic", 0x210A, 65537, false},
		{"", "", "generic", 0x210A, 65537, false},
	} {
		m := MechanismsFor(tc.manufacturer, tc.model)
		if m.Name != tc.name || m.KeyWrapRFC5649 != tc.wrap || m.RSAExponent != tc.exponent || m.EnforcesWrapWithTrusted != tc.trusted {
			t.Errorf("MechanismsFor(%q, %q) = %+v", tc.manufacturer, tc.model, m)
		}
	}
	nss := MechanismsFor("Mozilla Foundation", "NSS 3")
	if !nss.Unlisted(pkcs11.CKM_SHA1_KEY_DERIVATION) || nss.Unlisted(pkcs11.CKM_AES_CMAC) {
		t.Error("Unlisted")
	}
	// Each token gets its own copy.
	nss.UnlistedButWorking[0] = 0
	if MechanismsFor("Mozilla Foundation", "NSS 3").UnlistedButWorking[0] == 0 {
		t.Error("MechanismsFor hands out the shared table")
	}
}

func TestMechName(t *testing.T) {
	for code, want := range map[uint]string{
		pkcs11.CKM_RSA_PKCS_OAEP:    "CKM_RSA_PKCS_OAEP",
		pkcs11.CKM_AES_KEY_WRAP_PAD: "CKM_AES_KEY_WRAP_PAD",
		0x210B:                      "CKM_AES_KEY_WRAP_KWP",
		0x80001234:                  "CKM_0x80001234",
	} {
		if got := MechName(code); got != want {
			t.Errorf("MechName(0x%X) = %q, want %q", code, got, want)
		}
	}
}
