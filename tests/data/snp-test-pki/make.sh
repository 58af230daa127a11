#!/usr/bin/env bash
# Makes the TEST-ONLY SEV-SNP certificate chain the fake configfs-tsm kernel in
# tests/tests/tee_backend.rs signs with. It imitates AMD's chain (RSA-PSS SHA-384 ARK and
# ASK, a P-384 VCEK with the TCB and hwID extensions of the Milan sample VCEK) but is
# trusted by nothing: the pinned AMD roots reject it. Run once; the outputs are committed.
set -euo pipefail
cd "$(dirname "$0")"
pss=(-sha384 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:48 -sigopt rsa_mgf1_md:sha384)
subj="/OU=Engineering/C=US/L=Nowhere/ST=CA/O=Tessera TEST ONLY (not AMD)"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ark.key 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ask.key 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out vcek.key 2>/dev/null
cat > ext.cnf <<'CNF'
[req]
distinguished_name = dn
[dn]
[tca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
[vcek]
1.3.6.1.4.1.3704.1.1 = DER:02:01:00
1.3.6.1.4.1.3704.1.2 = DER:16:08:4D:69:6C:61:6E:2D:42:30
1.3.6.1.4.1.3704.1.3.1 = DER:02:01:03
1.3.6.1.4.1.3704.1.3.2 = DER:02:01:00
1.3.6.1.4.1.3704.1.3.4 = DER:02:01:00
1.3.6.1.4.1.3704.1.3.5 = DER:02:01:00
1.3.6.1.4.1.3704.1.3.6 = DER:02:01:00
1.3.6.1.4.1.3704.1.3.7 = DER:02:01:00
1.3.6.1.4.1.3704.1.3.3 = DER:02:01:08
1.3.6.1.4.1.3704.1.3.8 = DER:02:01:73
1.3.6.1.4.1.3704.1.4 = DER:D4:95:54:EC:71:7F:4E:5B:0F:E6:B1:43:BC:F0:40:5B:D7:AE:30:47:27:ED:F4:66:03:F2:A7:6A:EF:6A:3A:BC:15:D7:AF:38:DB:75:70:39:02:9F:0E:FA:CF:D0:8E:24:43:24:88:47:38:C7:2B:08:2E:2F:87:A4:4D:54:1E:B6
CNF
openssl req -x509 -new -key ark.key "${pss[@]}" -subj "$subj/CN=TEST-ARK" -days 36500 -set_serial 1 \
  -extensions tca -config ext.cnf -outform DER -out ark.der
openssl req -new -key ask.key -subj "$subj/CN=TEST-ASK" -out ask.csr
openssl x509 -req -in ask.csr -CA ark.der -CAform DER -CAkey ark.key "${pss[@]}" -days 36500 -set_serial 2 \
  -extfile ext.cnf -extensions tca -outform DER -out ask.der
openssl req -new -key vcek.key -subj "$subj/CN=TEST-VCEK" -out vcek.csr
openssl x509 -req -in vcek.csr -CA ask.der -CAform DER -CAkey ask.key "${pss[@]}" -days 36500 -set_serial 3 \
  -extfile ext.cnf -extensions vcek -outform DER -out vcek.der
openssl pkcs8 -topk8 -nocrypt -in vcek.key -outform DER -out vcek.pk8
# CRLs the ARK signs, as AMD's KDS serves (they list revoked ASKs): an empty one valid for
# a century, one revoking the ASK, and one whose nextUpdate has passed.
mkdir -p ca && : > ca/index.txt && echo 01 > ca/crlnumber
cat > ca.cnf <<'CNF'
[ca]
default_ca = test
[test]
database = ca/index.txt
crlnumber = ca/crlnumber
default_md = sha384
CNF
openssl x509 -inform DER -in ark.der -out ark.pem
openssl x509 -inform DER -in ask.der -out ask.pem
crlsig=(-md sha384 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:48 -sigopt rsa_mgf1_md:sha384)
crl() { openssl ca -config ca.cnf -gencrl -cert ark.pem -keyfile ark.key "${crlsig[@]}" -crl_lastupdate "$1" -crl_nextupdate "$2" -out "$3.pem"
        openssl crl -in "$3.pem" -outform DER -out "$3.der"; rm -f "$3.pem"; }
crl 20260101000000Z 21260101000000Z crl-empty
crl 20260101000000Z 20260201000000Z crl-expired
openssl ca -config ca.cnf -revoke ask.pem -cert ark.pem -keyfile ark.key -md sha384
crl 20260101000000Z 21260101000000Z crl-revoking-ask
rm -rf ca ca.cnf ark.pem ask.pem
rm -f ark.key ask.key vcek.key ask.csr vcek.csr ext.cnf
# The extended-report certificate table the fake host hands out (also the fuzz seed of
# the snp_cert_table target); tests/tests/tee_backend.rs checks it is FakeSnpGuest's.
python3 - <<'PY'
import struct, uuid
certs = [("63da758d-e664-4564-adc5-f4b93be8accd", "vcek.der"), ("4ab7b379-bbac-4fe4-a02f-05aef327c782", "ask.der"), ("c0b406a4-a803-4952-9743-3fb6014cd0ae", "ark.der")]
blobs = [(uuid.UUID(g).bytes_le, open(f, "rb").read()) for g, f in certs]
offset, table = (len(blobs) + 1) * 24, b""
for guid, der in blobs:
    table += guid + struct.pack("<II", offset, len(der))
    offset += len(der)
table += bytes(24) + b"".join(der for _, der in blobs)
open("cert-table.bin", "wb").write(table)
PY
