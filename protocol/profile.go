// Package protocol fixes what the card and the issuer's token must agree on
// byte for byte: the profiles (transport × KDF), the binding data B, the
// card-side computation of c and K_I, and the authentication MAC.
//
// The functions that compute K_I here are the card's side of the protocol.
// The issuer never calls them: it derives K_I inside a PKCS#11 token (package
// hsm). They exist so the virtual card can run them and so that test vectors
// can be produced and checked. The normative text is docs/PROTOCOL.md.
package protocol

import (
	"fmt"
	"strings"
)

// Transport is how the card sends its secret S to the issuer.
type Transport uint8

const (
	// RSARaw is the paper's §5.1 as written: c = r^e mod n, S = I2OSP(r, k).
	RSARaw Transport = iota + 1
	// RSAOAEP is §5.1 with RSAES-OAEP (SHA-1, MGF1-SHA-1, empty label):
	// S = r, 32 random bytes; the CCA-secure choice asked for in §4.5.
	RSAOAEP
	// ECDHP256 is §5.2 (ElGamal / Diffie–Hellman) on P-256: the card sends
	// g^r, S = x-coordinate of h^r.
	ECDHP256
)

func (t Transport) String() string {
	switch t {
	case RSARaw:
		return "rsa-raw"
	case RSAOAEP:
		return "rsa-oaep"
	case ECDHP256:
		return "ecdh-p256"
	}
	return fmt.Sprintf("transport(%d)", uint8(t))
}

// KDF is how K_I is derived from S and the binding data B.
type KDF uint8

const (
	// SHA1 is the paper's K_I = SHA-1(S ‖ B), truncated to 16 bytes.
	SHA1 KDF = iota + 1
	// X963 is the ANSI X9.63 KDF with SHA-1 and shared info B:
	// K_I = SHA-1(S ‖ 00000001 ‖ B), truncated to 16 bytes.
	X963
	// AES is K_I = AES-256-Encrypt_S(SHA-256(B)[0:16]), for tokens that
	// cannot derive with a hash (the ideal-cipher variant of the paper's H).
	AES
	// KBKDF is the NIST SP 800-108r1 KDF in counter mode with PRF
	// HMAC-SHA256, key S, Label KBKDFLabel, Context B and L = 128 bits
	// (kbkdf.go): a PRF in place of the random oracle, for tokens that
	// offer CKM_SP800_108_COUNTER_KDF but no hash derivation.
	KBKDF
)

func (k KDF) String() string {
	switch k {
	case SHA1:
		return "sha1"
	case X963:
		return "x963"
	case AES:
		return "aes"
	case KBKDF:
		return "kbkdf"
	}
	return fmt.Sprintf("kdf(%d)", uint8(k))
}

// Profile is one valid combination of transport and KDF. Its ID is the byte
// sent in P1 of PERSONALIZE; its Name is the identifier bound into B.
type Profile struct {
	ID        byte
	Name      string
	Transport Transport
	KDF       KDF
}

func (p Profile) String() string { return p.Name }

// The seven profiles. IDs and names are part of the wire format and of B:
// never renumber or rename one, add new ones instead.
var (
	RSARawSHA1    = Profile{0x01, "rsa-raw-sha1", RSARaw, SHA1}
	RSAOAEPSHA1   = Profile{0x02, "rsa-oaep-sha1", RSAOAEP, SHA1}
	RSAOAEPAES    = Profile{0x03, "rsa-oaep-aes", RSAOAEP, AES}
	ECDHP256X963  = Profile{0x04, "ecdh-p256-x963", ECDHP256, X963}
	ECDHP256AES   = Profile{0x05, "ecdh-p256-aes", ECDHP256, AES}
	RSAOAEPKBKDF  = Profile{0x06, "rsa-oaep-kbkdf", RSAOAEP, KBKDF}
	ECDHP256KBKDF = Profile{0x07, "ecdh-p256-kbkdf", ECDHP256, KBKDF}
	profiles      = []Profile{RSARawSHA1, RSAOAEPSHA1, RSAOAEPAES, ECDHP256X963, ECDHP256AES, RSAOAEPKBKDF, ECDHP256KBKDF}
	profileNames  = func() string {
		var n []string
		for _, p := range profiles {
			n = append(n, p.Name)
		}
		return strings.Join(n, ", ")
	}()
)

// Profiles returns every valid profile in ID order.
func Profiles() []Profile { return append([]Profile(nil), profiles...) }

// ProfileByName looks a profile up by its identifier, e.g. "rsa-oaep-aes".
func ProfileByName(name string) (Profile, error) {
	for _, p := range profiles {
		if p.Name == name {
			return p, nil
		}
	}
	return Profile{}, fmt.Errorf("unknown profile %q (valid: %s)", name, profileNames)
}

// ProfileByID looks a profile up by its wire identifier.
func ProfileByID(id byte) (Profile, error) {
	for _, p := range profiles {
		if p.ID == id {
			return p, nil
		}
	}
	return Profile{}, fmt.Errorf("unknown profile id 0x%02X", id)
}
