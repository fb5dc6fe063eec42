package pinholder

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/protocol"
)

// Path IDs. The per-token list of paths a token cannot close
// (hsm.Mechanisms.OpenPaths) uses these strings; the tests hold the two
// equal.
const (
	KEKReadValue       = "kek-read-value"
	KEKSetDecrypt      = "kek-set-decrypt"
	KEKSetExtractable  = "kek-set-extractable"
	KEKCopyDecrypt     = "kek-copy-decrypt"
	KEKCopyModifiable  = "kek-copy-modifiable"
	KEKDecrypt         = "kek-decrypt"
	KEKWrapOwn         = "kek-wrap-under-own-key"
	BlobUnwrapExtract  = "blob-unwrap-extractable"
	BlobUnwrapOwnWrap  = "blob-unwrap-wrap-under-own-key"
	BlobUnwrapDerive   = "blob-unwrap-derive"
	BlobOwnTrusted     = "blob-wrap-under-own-trusted-key"
	SKSetDecrypt       = "sk-set-decrypt"
	SKSetSign          = "sk-set-sign"
	SKCopyDecrypt      = "sk-copy-decrypt"
	SKCopyModifiable   = "sk-copy-modifiable"
	SKWrapOwn          = "sk-wrap-under-own-key"
	SUnwrapExtractable = "s-unwrap-extractable"
	SUnwrapEncrypt     = "s-unwrap-encrypt"
	SUnwrapOwnWrap     = "s-unwrap-wrap-under-own-key"
	SDeriveExtractable = "s-derive-extractable"
	SDigestKey         = "s-digest-key"
	ECDeriveExtract    = "ec-derive-extractable"
	ECWrapOwn          = "ec-wrap-under-own-key"
	TKCopyExtractable  = "transcript-copy-extractable"
	TKWrapOwn          = "transcript-wrap-under-own-key"
	SOLoginUserPIN     = "so-login-with-user-pin"
	// The export of K_I to a receiver (docs/EXPORT.md).
	KeyImportDecrypt  = "key-import-decrypt"
	KTKUnwrapReadable = "ktk-unwrap-extractable"
	KTKUnwrapUnwrap   = "ktk-unwrap-unwrapper"
	KTKWrapOwn        = "ktk-wrap-under-own-key"
	BlobUnderOwnKTK   = "blob-export-under-own-ktk"
)

type need uint8

const (
	needNone need = iota
	needKEK
	needPIN
)

type path struct {
	id, target, attack, yields, closable string
	needs                                need
	try                                  func(e *env, s hsm.Session) (string, error)
}

// paths is every way out the adversary knows, in report order.
var paths = []path{
	{KEKReadValue, "KEK", "C_GetAttributeValue(CKA_VALUE) of the KEK", "every stored K_I",
		"CKA_SENSITIVE true", needKEK, func(e *env, s hsm.Session) (string, error) { return e.readValue(s, e.kekH(s), "the KEK") }},
	{KEKDecrypt, "KEK", "C_DecryptInit(CKM_AES_ECB, KEK) as it is", "every stored K_I",
		"CKA_DECRYPT false", needKEK, func(e *env, s hsm.Session) (string, error) { return e.blobByOracle(s, e.kekH(s)) }},
	{KEKSetDecrypt, "KEK", "C_SetAttributeValue(KEK, CKA_DECRYPT true), then AES-ECB-decrypt a stored blob block by block", "every stored K_I",
		"CKA_MODIFIABLE false", needKEK, func(e *env, s hsm.Session) (string, error) {
			h := e.kekH(s)
			if err := refused("C_SetAttributeValue(CKA_DECRYPT true)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true)})); err != nil {
				return "", err
			}
			return e.blobByOracle(s, h)
		}},
	{KEKSetExtractable, "KEK", "C_SetAttributeValue(KEK, CKA_SENSITIVE false), then read CKA_VALUE", "every stored K_I",
		"CKA_SENSITIVE is one-way (PKCS#11) and CKA_MODIFIABLE false", needKEK, func(e *env, s hsm.Session) (string, error) {
			h := e.kekH(s)
			if err := refused("C_SetAttributeValue(CKA_SENSITIVE false)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false)})); err != nil {
				return "", err
			}
			return e.readValue(s, h, "the KEK")
		}},
	{KEKCopyDecrypt, "KEK", "C_CopyObject(KEK, {CKA_TOKEN false, CKA_DECRYPT true}), then decrypt a blob with the copy", "every stored K_I",
		"CKA_MODIFIABLE false (SoftHSM2 refuses every changing copy of a read-only object) or CKA_COPYABLE false", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			c, err := e.copy(s, e.kekH(s), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true))
			if err != nil {
				return "", err
			}
			return e.blobByOracle(s, c)
		}},
	{KEKCopyModifiable, "KEK", "C_CopyObject(KEK, {CKA_TOKEN false, CKA_MODIFIABLE true}), set CKA_DECRYPT on the copy, decrypt a blob", "every stored K_I",
		"a token that keeps CKA_MODIFIABLE false on copies, or CKA_COPYABLE false; NSS softokn 3.87 knows no CKA_COPYABLE and makes the copy modifiable", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			c, err := e.copy(s, e.kekH(s), pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, true))
			if err != nil {
				return "", err
			}
			if err := refused("C_SetAttributeValue(copy, CKA_DECRYPT true)", s.P.SetAttributeValue(s.H, c, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true)})); err != nil {
				return "", err
			}
			return e.blobByOracle(s, c)
		}},
	{KEKWrapOwn, "KEK", "C_WrapKey(own key, KEK) under a key the attacker made, then decrypt on the host", "the KEK's value, so every stored K_I",
		"CKA_EXTRACTABLE false; NSS softokn 3.87 wraps non-extractable keys all the same", needKEK,
		func(e *env, s hsm.Session) (string, error) { return e.wrapOwn(s, e.kekH(s), "the KEK", nil) }},
	{BlobUnwrapExtract, "stored K_I", "C_UnwrapKey(KEK, blob) into a non-sensitive, extractable key, read CKA_VALUE", "K_I",
		"the KEK's CKA_UNWRAP_TEMPLATE (enforced by SoftHSM2; NSS softokn 3.87 ignores it)", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapBlob(s, attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true))
			if err != nil {
				return "", err
			}
			return e.readValueWant(s, k, e.kiBlob, "K_I")
		}},
	{BlobUnwrapOwnWrap, "stored K_I", "C_UnwrapKey(KEK, blob) into an extractable key as the KEK's template allows, C_WrapKey under the attacker's own key", "K_I",
		"CKA_WRAP_WITH_TRUSTED in the KEK's unwrap template, enforced (SoftHSM2; NSS softokn 3.87 enforces neither)", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapBlob(s, append(policy(hsm.KEKUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, true))...)
			if err != nil {
				return "", err
			}
			return e.wrapOwn(s, k, "K_I", e.kiBlob)
		}},
	{BlobUnwrapDerive, "stored K_I", "C_UnwrapKey(KEK, blob) as a derivable key, CONCATENATE_BASE_AND_DATA into an extractable key (K_I ‖ data)", "K_I",
		"CKA_DERIVE false in the KEK's unwrap template, enforced (SoftHSM2)", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapBlob(s, attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_DERIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false))
			if err != nil {
				return "", err
			}
			return e.concatOut(s, k, e.kiBlob, "K_I")
		}},
	{BlobOwnTrusted, "stored K_I", "make an AES key with CKA_TRUSTED true as the user, unwrap a blob extractable with CKA_WRAP_WITH_TRUSTED, wrap it under that key", "K_I",
		"only the security officer may set CKA_TRUSTED (SoftHSM2); NSS softokn lets the user set it but enforces nothing", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			own, val, err := e.ownKey(s, attr(pkcs11.CKA_TRUSTED, true))
			if err != nil {
				return "", err
			}
			k, err := e.unwrapBlob(s, append(policy(hsm.KEKUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, true))...)
			if err != nil {
				return "", err
			}
			return e.wrapUnder(s, own, val, k, "K_I", e.kiBlob)
		}},
	{SKSetDecrypt, "issuer key (RSA)", "C_SetAttributeValue(SK, CKA_DECRYPT true), then C_Decrypt(RSA-OAEP, c)", "S, hence K_I",
		"CKA_MODIFIABLE false", needNone, func(e *env, s hsm.Session) (string, error) {
			h := e.rsaH(s)
			if err := refused("C_SetAttributeValue(CKA_DECRYPT true)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true)})); err != nil {
				return "", err
			}
			return e.oaepDecrypt(s, h)
		}},
	{SKSetSign, "issuer key (RSA)", "C_SetAttributeValue(SK, CKA_SIGN true), then C_Sign(CKM_RSA_X_509, c) = c^d", "S (the raw RSA decryption of c)",
		"CKA_MODIFIABLE false", needNone, func(e *env, s hsm.Session) (string, error) {
			h := e.rsaH(s)
			if err := refused("C_SetAttributeValue(CKA_SIGN true)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_SIGN, true)})); err != nil {
				return "", err
			}
			m := pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil)
			if err := refused("C_SignInit(CKM_RSA_X_509)", s.P.SignInit(s.H, []*pkcs11.Mechanism{m}, h)); err != nil {
				return "", err
			}
			em, err := s.P.Sign(s.H, e.cRSA)
			if err := refused("C_Sign", err); err != nil {
				return "", err
			}
			return fmt.Sprintf("c^d on the host (%d bytes: the OAEP encoding of S)", len(em)), nil
		}},
	{SKCopyDecrypt, "issuer key (RSA)", "C_CopyObject(SK, {CKA_TOKEN false, CKA_DECRYPT true}), then C_Decrypt c", "S, hence K_I",
		"CKA_COPYABLE false or CKA_MODIFIABLE false", needNone, func(e *env, s hsm.Session) (string, error) {
			c, err := e.copy(s, e.rsaH(s), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true))
			if err != nil {
				return "", err
			}
			return e.oaepDecrypt(s, c)
		}},
	{SKCopyModifiable, "issuer key (RSA)", "C_CopyObject(SK, {CKA_TOKEN false, CKA_MODIFIABLE true}), set CKA_DECRYPT on the copy, C_Decrypt c", "S, hence K_I",
		"CKA_COPYABLE false; NSS softokn 3.87 knows no CKA_COPYABLE and makes the copy modifiable", needNone,
		func(e *env, s hsm.Session) (string, error) {
			c, err := e.copy(s, e.rsaH(s), pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, true))
			if err != nil {
				return "", err
			}
			if err := refused("C_SetAttributeValue(copy, CKA_DECRYPT true)", s.P.SetAttributeValue(s.H, c, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true)})); err != nil {
				return "", err
			}
			return e.oaepDecrypt(s, c)
		}},
	{SKWrapOwn, "issuer key (RSA)", "C_WrapKey(own key, SK), decrypt on the host", "SK (PKCS#8), so every S",
		"CKA_EXTRACTABLE false; NSS softokn 3.87 wraps non-extractable keys all the same", needNone,
		func(e *env, s hsm.Session) (string, error) {
			return e.wrapOwn(s, e.rsaH(s), "the issuer private key", nil)
		}},
	{SUnwrapExtractable, "S (RSA)", "C_UnwrapKey(SK, c) into a non-sensitive, extractable key, read CKA_VALUE", "S",
		"the issuer key's CKA_UNWRAP_TEMPLATE (SoftHSM2; NSS softokn 3.87 ignores it)", needNone,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapS(s, attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true))
			if err != nil {
				return "", err
			}
			return e.readValueWant(s, k, e.s32, "S")
		}},
	{SUnwrapEncrypt, "S (RSA)", "C_UnwrapKey(SK, c) as a sensitive AES key with CKA_ENCRYPT, C_Encrypt(AES-ECB) of the aes KDF's block", "K_I (aes KDF)",
		"CKA_ENCRYPT false in the issuer key's unwrap template, enforced (SoftHSM2)", needNone,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapS(s, attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true), attr(pkcs11.CKA_ENCRYPT, true))
			if err != nil {
				return "", err
			}
			m := pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)
			if err := refused("C_EncryptInit(CKM_AES_ECB, S)", s.P.EncryptInit(s.H, []*pkcs11.Mechanism{m}, k)); err != nil {
				return "", err
			}
			out, err := s.P.Encrypt(s.H, e.blockRSA)
			if err := refused("C_Encrypt", err); err != nil {
				return "", err
			}
			return confirm(out[:protocol.KeySize], e.kiAES, "K_I")
		}},
	{SUnwrapOwnWrap, "S (RSA)", "C_UnwrapKey(SK, c) extractable as the template allows, C_WrapKey under the attacker's own key", "S",
		"CKA_WRAP_WITH_TRUSTED in the issuer key's unwrap template, enforced (SoftHSM2)", needNone,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapS(s, append(policy(hsm.SecretUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, true))...)
			if err != nil {
				return "", err
			}
			return e.wrapOwn(s, k, "S", e.s32)
		}},
	{SDeriveExtractable, "S (RSA)", "C_UnwrapKey(SK, c) as the chain does, C_DeriveKey(AES_ECB_ENCRYPT_DATA) into a non-sensitive, extractable key", "K_I (aes KDF)",
		"CKA_DERIVE_TEMPLATE (PKCS#11 3.0) in the issuer key's unwrap template, or a token that makes keys derived from sensitive keys sensitive; neither SoftHSM2 2.6.1 nor NSS softokn 3.87 has either", needNone,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapS(s, append(policy(hsm.SecretUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, false))...)
			if err != nil {
				return "", err
			}
			m, free, err := hsm.StringDataMechanism(pkcs11.CKM_AES_ECB_ENCRYPT_DATA, e.blockRSA)
			if err != nil {
				return "", err
			}
			defer free()
			d, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, k, append(readable(pkcs11.CKK_AES), attr(pkcs11.CKA_VALUE_LEN, protocol.KeySize)))
			if err := refused("C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)", err); err != nil {
				return "", err
			}
			e.keep(d)
			return e.readValueWant(s, d, e.kiAES, "K_I")
		}},
	{SDigestKey, "S (RSA)", "C_UnwrapKey(SK, c) as the chain does, C_DigestKey(S) then C_DigestUpdate(B) with SHA-1", "K_I of the sha1 KDF (SHA-1(S ‖ B)); a hash of S otherwise",
		"nothing in PKCS#11 forbids C_DigestKey of a sensitive key; a token must refuse it itself", needNone,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapS(s, append(policy(hsm.SecretUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, false))...)
			if err != nil {
				return "", err
			}
			m := pkcs11.NewMechanism(pkcs11.CKM_SHA_1, nil)
			if err := refused("C_DigestInit(CKM_SHA_1)", s.P.DigestInit(s.H, []*pkcs11.Mechanism{m})); err != nil {
				return "", err
			}
			if err := refused("C_DigestKey(S)", s.P.DigestKey(s.H, k)); err != nil {
				s.P.DigestFinal(s.H)
				return "", err
			}
			if err := refused("C_DigestUpdate(B)", s.P.DigestUpdate(s.H, protocol.Binding(protocol.RSAOAEPSHA1, e.rsa.Public.SPKI))); err != nil {
				s.P.DigestFinal(s.H)
				return "", err
			}
			d, err := s.P.DigestFinal(s.H)
			if err := refused("C_DigestFinal", err); err != nil {
				return "", err
			}
			return confirm(d[:protocol.KeySize], e.kiSHA1, "the sha1 KDF's K_I")
		}},
	{ECDeriveExtract, "issuer key (EC)", "C_DeriveKey(ECDH1_DERIVE, CKD_NULL, c) into a non-sensitive, extractable key", "Z, hence K_I",
		"CKA_DERIVE_TEMPLATE (PKCS#11 3.0) on the EC issuer key; neither SoftHSM2 2.6.1 nor NSS softokn 3.87 accepts it", needNone,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.ec.Handle(s)
			if err != nil {
				return "", err
			}
			m := pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE, pkcs11.NewECDH1DeriveParams(pkcs11.CKD_NULL, nil, e.cEC))
			d, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, h, append(readable(pkcs11.CKK_GENERIC_SECRET), attr(pkcs11.CKA_VALUE_LEN, 32)))
			if err := refused("C_DeriveKey(CKM_ECDH1_DERIVE)", err); err != nil {
				return "", err
			}
			e.keep(d)
			return e.readValueWant(s, d, e.z, "Z")
		}},
	{ECWrapOwn, "issuer key (EC)", "C_WrapKey(own key, EC SK), decrypt on the host", "the EC private key, so every Z",
		"CKA_EXTRACTABLE false; NSS softokn 3.87 wraps non-extractable keys all the same", needNone,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.ec.Handle(s)
			if err != nil {
				return "", err
			}
			return e.wrapOwn(s, h, "the EC issuer private key", nil)
		}},
	{TKCopyExtractable, "transcript key", "C_CopyObject(transcript key, {CKA_TOKEN false, CKA_EXTRACTABLE true}), wrap the copy under the attacker's own key", "the transcript signing key (forged transcripts)",
		"CKA_EXTRACTABLE is one-way (PKCS#11), CKA_MODIFIABLE false, CKA_COPYABLE false", needNone,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.tk.Handle(s)
			if err != nil {
				return "", err
			}
			c, err := e.copy(s, h, pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true))
			if err != nil {
				return "", err
			}
			return e.wrapOwn(s, c, "the transcript private key", nil)
		}},
	{TKWrapOwn, "transcript key", "C_WrapKey(own key, transcript key), decrypt on the host", "the transcript signing key (forged transcripts)",
		"CKA_EXTRACTABLE false; NSS softokn 3.87 wraps non-extractable keys all the same", needNone,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.tk.Handle(s)
			if err != nil {
				return "", err
			}
			return e.wrapOwn(s, h, "the transcript private key", nil)
		}},
	{KeyImportDecrypt, "key-import key", "C_Decrypt(CKM_RSA_PKCS_OAEP) of the wrapped KTK the receiver sent (it crosses the network) with the key-import key", "the KTK, so every K_I exported under it",
		"CKA_DECRYPT false on the key-import key", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.ik.Handle(s)
			if err != nil {
				return "", err
			}
			m := hsm.KeyImportOAEP()
			if err := refused("C_DecryptInit(CKM_RSA_PKCS_OAEP, key-import key)", s.P.DecryptInit(s.H, []*pkcs11.Mechanism{m}, h)); err != nil {
				return "", err
			}
			out, err := s.P.Decrypt(s.H, e.ktkWrapped)
			if err := refused("C_Decrypt", err); err != nil {
				return "", err
			}
			return confirm(out, e.ktkValue, "the KTK")
		}},
	{KTKUnwrapReadable, "key-import key", "C_UnwrapKey(key-import key, the wrapped KTK) into a non-sensitive, extractable key, read CKA_VALUE", "the KTK, so every K_I exported under it",
		"the key-import key's CKA_UNWRAP_TEMPLATE (hsm.KTKUnwrapTemplate), enforced (SoftHSM2; NSS softokn 3.87 ignores it)", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapKTK(s, readable(pkcs11.CKK_AES)...)
			if err != nil {
				return "", err
			}
			return e.readValueWant(s, k, e.ktkValue, "the KTK")
		}},
	{KTKUnwrapUnwrap, "exported K_I", "C_UnwrapKey(key-import key, the wrapped KTK) into a key that can unwrap, then C_UnwrapKey(that, an export line) into a readable key", "every K_I exported under the KTK",
		"CKA_UNWRAP false in the key-import key's CKA_UNWRAP_TEMPLATE, enforced (SoftHSM2; NSS softokn 3.87 ignores it)", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			k, err := e.unwrapKTK(s, append(policy(hsm.KTKUnwrapTemplate), attr(pkcs11.CKA_UNWRAP, true))...)
			if err != nil {
				return "", err
			}
			m := pkcs11.NewMechanism(s.M.AESKeyWrap(), nil)
			ki, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, k, e.export, readable(pkcs11.CKK_AES))
			if err := refused("C_UnwrapKey(the KTK copy, export line)", err); err != nil {
				return "", err
			}
			e.keep(ki)
			return e.readValueWant(s, ki, e.kiBlob, "K_I")
		}},
	{KTKWrapOwn, "KTK", "C_WrapKey(own key, KTK), decrypt on the host", "the KTK, so every K_I exported under it",
		"CKA_EXTRACTABLE false; NSS softokn 3.87 wraps non-extractable keys all the same", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.ktk.Handle(s)
			if err != nil {
				return "", err
			}
			return e.wrapOwn(s, h, "the KTK", e.ktkValue)
		}},
	{BlobUnderOwnKTK, "stored K_I", "encrypt a KTK of the attacker's to the key-import key (its public key is public), unwrap it as a KTK, unwrap a blob under the KEK as an export does and wrap it under that KTK", "K_I",
		"CKA_WRAP_WITH_TRUSTED, enforced (SoftHSM2): only the SO makes a KTK trusted; NSS softokn 3.87 does not enforce it", needKEK,
		func(e *env, s hsm.Session) (string, error) {
			own := make([]byte, hsm.KTKLen)
			rand.Read(own)
			c, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, e.ik.Public.RSA, own, nil)
			if err != nil {
				return "", err
			}
			ktk, err := e.unwrapKTKFrom(s, c, append(policy(hsm.KTKUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, false))...)
			if err != nil {
				return "", err
			}
			k, err := e.unwrapBlob(s, append(policy(hsm.KEKUnwrapTemplate), attr(pkcs11.CKA_EXTRACTABLE, true))...)
			if err != nil {
				return "", err
			}
			return e.wrapUnder(s, ktk, own, k, "K_I", e.kiBlob)
		}},
	{SOLoginUserPIN, "security officer", "C_Login(CKU_SO) with the user PIN", "the SO role: CKA_TRUSTED on a key of the attacker's, hence every K_I",
		"an SO PIN other than the user PIN", needPIN, nil},
}

func init() {
	// The SO login path runs outside With (needPIN): WithSO needs the
	// pool to itself.
	for i := range paths {
		if paths[i].id == SOLoginUserPIN {
			paths[i].try = func(e *env, _ hsm.Session) (string, error) { return e.soLogin() }
		}
	}
}

// keep records a session object an attack made, for Run to destroy.
func (e *env) keep(h pkcs11.ObjectHandle) pkcs11.ObjectHandle {
	if h != 0 {
		e.made = append(e.made, h)
	}
	return h
}

func attr(t uint, v any) *pkcs11.Attribute { return pkcs11.NewAttribute(t, v) }

// policy states a template's attributes as a PKCS#11 template (what an
// attacker must state to pass the token's check).
func policy(p map[uint]bool) []*pkcs11.Attribute {
	var a []*pkcs11.Attribute
	for t, v := range p {
		a = append(a, attr(t, v))
	}
	return a
}

// readable is the template of a key the attacker can read: a session
// object, not sensitive, extractable.
func readable(keyType uint) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, keyType),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true)}
}

func (e *env) kekH(s hsm.Session) pkcs11.ObjectHandle { h, _ := e.kek.Handle(s); return h }
func (e *env) rsaH(s hsm.Session) pkcs11.ObjectHandle { h, _ := e.rsa.Handle(s); return h }

func (e *env) readValue(s hsm.Session, h pkcs11.ObjectHandle, what string) (string, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE, nil)})
	if err := refused("C_GetAttributeValue(CKA_VALUE)", err); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s on the host (%d bytes)", what, len(a[0].Value)), nil
}

func (e *env) readValueWant(s hsm.Session, h pkcs11.ObjectHandle, want []byte, what string) (string, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE, nil)})
	if err := refused("C_GetAttributeValue(CKA_VALUE)", err); err != nil {
		return "", err
	}
	return confirm(a[0].Value, want, what)
}

// copy makes a session copy of h with one changed attribute.
func (e *env) copy(s hsm.Session, h pkcs11.ObjectHandle, change *pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	c, err := s.P.CopyObject(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), change})
	return e.keep(c), refused("C_CopyObject", err)
}

// blobByOracle decrypts the stored blob on the host with AES-ECB
// decryptions by key h in the token.
func (e *env) blobByOracle(s hsm.Session, h pkcs11.ObjectHandle) (string, error) {
	return decryptBlobByOracle(s, h, e.blob.Wrapped, e.kiBlob)
}

// decryptBlobByOracle unwraps the RFC 5649 blob wrapped on the host with
// AES-ECB decryptions by key h in the token, and confirms it gives ki.
func decryptBlobByOracle(s hsm.Session, h pkcs11.ObjectHandle, wrapped, ki []byte) (string, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)
	got, err := unwrapKWP(func(in []byte) ([]byte, error) {
		if err := refused("C_DecryptInit(CKM_AES_ECB)", s.P.DecryptInit(s.H, []*pkcs11.Mechanism{m}, h)); err != nil {
			return nil, err
		}
		out, err := s.P.Decrypt(s.H, in)
		return out, refused("C_Decrypt", err)
	}, wrapped)
	if err != nil {
		return "", err
	}
	return confirm(got, ki, "K_I")
}

func (e *env) oaepDecrypt(s hsm.Session, h pkcs11.ObjectHandle) (string, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))
	if err := refused("C_DecryptInit(CKM_RSA_PKCS_OAEP)", s.P.DecryptInit(s.H, []*pkcs11.Mechanism{m}, h)); err != nil {
		return "", err
	}
	out, err := s.P.Decrypt(s.H, e.cRSA)
	if err := refused("C_Decrypt", err); err != nil {
		return "", err
	}
	return confirm(out, e.s32, "S")
}

func (e *env) unwrapS(s hsm.Session, extra ...*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))
	t := append([]*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), attr(pkcs11.CKA_TOKEN, false)}, extra...)
	k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, e.rsaH(s), e.cRSA, dedup(t))
	return e.keep(k), refused("C_UnwrapKey(SK, c)", err)
}

func (e *env) unwrapBlob(s hsm.Session, extra ...*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	m := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
	t := append([]*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), attr(pkcs11.CKA_TOKEN, false)}, extra...)
	k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, e.kekH(s), e.blob.Wrapped, dedup(t))
	return e.keep(k), refused("C_UnwrapKey(KEK, blob)", err)
}

// unwrapKTK unwraps the receiver's wrapped KTK (the file it sent) under
// the key-import key with the attacker's template.
func (e *env) unwrapKTK(s hsm.Session, extra ...*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	return e.unwrapKTKFrom(s, e.ktkWrapped, extra...)
}

func (e *env) unwrapKTKFrom(s hsm.Session, c []byte, extra ...*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	h, err := e.ik.Handle(s)
	if err != nil {
		return 0, err
	}
	t := append([]*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), attr(pkcs11.CKA_TOKEN, false)}, extra...)
	k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{hsm.KeyImportOAEP()}, h, c, dedup(t))
	return e.keep(k), refused("C_UnwrapKey(key-import key, wrapped KTK)", err)
}

// dedup keeps the last value of each attribute type: an attack states a
// policy and then overrides one attribute.
func dedup(t []*pkcs11.Attribute) []*pkcs11.Attribute {
	last := map[uint]int{}
	for i, a := range t {
		last[a.Type] = i
	}
	var out []*pkcs11.Attribute
	for i, a := range t {
		if last[a.Type] == i {
			out = append(out, a)
		}
	}
	return out
}

// ownLabel labels the attacker's own keys: SoftHSM2 2.6.1 leaves the
// object of a C_GenerateKey it refuses (CKA_TRUSTED by the user) in the
// session, and Run finds and destroys it by this label.
const ownLabel = "pinholder-attacker-own-key"

// ownKey makes the attacker's AES-256 wrapping key and reads its value.
func (e *env) ownKey(s hsm.Session, extra ...*pkcs11.Attribute) (pkcs11.ObjectHandle, []byte, error) {
	t := append(readable(pkcs11.CKK_AES), attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_WRAP, true), attr(pkcs11.CKA_UNWRAP, true),
		attr(pkcs11.CKA_ENCRYPT, true), attr(pkcs11.CKA_DECRYPT, true), attr(pkcs11.CKA_LABEL, ownLabel))
	h, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, append(t, extra...))
	if err := refused("C_GenerateKey(the attacker's own key)", err); err != nil {
		return 0, nil, err
	}
	e.keep(h)
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE, nil)})
	if err != nil {
		return 0, nil, fmt.Errorf("read the attacker's own key: %w", err)
	}
	return h, a[0].Value, nil
}

// wrapOwn wraps target under a fresh key of the attacker's and decrypts
// the result on the host; want, if not nil, is the secret it must equal.
func (e *env) wrapOwn(s hsm.Session, target pkcs11.ObjectHandle, what string, want []byte) (string, error) {
	own, val, err := e.ownKey(s)
	if err != nil {
		return "", err
	}
	return e.wrapUnder(s, own, val, target, what, want)
}

// wrapOut wraps target under the attacker's key own (value val: known to
// the attacker, or to a receiver for a KTK) and decrypts the result on
// the host: CBC-PAD where the token wraps with it, else RFC 5649.
func (e *env) wrapOut(s hsm.Session, own pkcs11.ObjectHandle, val []byte, target pkcs11.ObjectHandle) ([]byte, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, make([]byte, 16))
	w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, own, target)
	if hsm.IsRV(err, pkcs11.CKR_MECHANISM_INVALID) {
		// SoftHSM2 wraps with RFC 5649, not CBC-PAD.
		m = pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
		if w, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, own, target); err == nil {
			dec, derr := aesDecrypter(val)
			if derr != nil {
				return nil, derr
			}
			return unwrapKWP(dec, w)
		}
	}
	if err := refused("C_WrapKey(the attacker's own key)", err); err != nil {
		return nil, err
	}
	return cbcPadDecrypt(val, w)
}

func (e *env) wrapUnder(s hsm.Session, own pkcs11.ObjectHandle, val []byte, target pkcs11.ObjectHandle, what string, want []byte) (string, error) {
	got, err := e.wrapOut(s, own, val, target)
	var r *refusal
	if errors.As(err, &r) {
		return "", err
	}
	return e.opened(got, err)(what, want)
}

func (e *env) opened(got []byte, err error) func(string, []byte) (string, error) {
	return func(what string, want []byte) (string, error) {
		if err != nil {
			return "", fmt.Errorf("decrypt the attacker's wrap on the host: %w", err)
		}
		if want != nil {
			return confirm(got, want, what)
		}
		return fmt.Sprintf("%s on the host (%d bytes)", what, len(got)), nil
	}
}

// concatOut derives base ‖ data into a readable key and checks that it
// begins with want.
func (e *env) concatOut(s hsm.Session, base pkcs11.ObjectHandle, want []byte, what string) (string, error) {
	data := []byte{0}
	m, free, err := hsm.StringDataMechanism(pkcs11.CKM_CONCATENATE_BASE_AND_DATA, data)
	if err != nil {
		return "", err
	}
	defer free()
	d, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, base, append(readable(pkcs11.CKK_GENERIC_SECRET), attr(pkcs11.CKA_VALUE_LEN, len(want)+len(data))))
	if err := refused("C_DeriveKey(CKM_CONCATENATE_BASE_AND_DATA)", err); err != nil {
		return "", err
	}
	e.keep(d)
	a, err := s.P.GetAttributeValue(s.H, d, []*pkcs11.Attribute{attr(pkcs11.CKA_VALUE, nil)})
	if err := refused("C_GetAttributeValue(CKA_VALUE)", err); err != nil {
		return "", err
	}
	if len(a[0].Value) < len(want) {
		return "", fmt.Errorf("concatenation gave %d bytes", len(a[0].Value))
	}
	return confirm(a[0].Value[:len(want)], want, what)
}

// soLogin tries the SO role with the user PIN.
func (e *env) soLogin() (string, error) {
	err := e.tok.WithSO(e.ctx, e.opt.UserPIN, func(hsm.Session) error { return nil })
	if err == nil {
		return "logged in as the security officer with the user PIN", nil
	}
	if rv, ok := hsm.RV(err); ok {
		return "", &refusal{step: "C_Login(CKU_SO, user PIN)", rv: rvName(rv)}
	}
	return "", err
}
