-- Sample source tables for trying embsync locally (scripts/demo.sh loads this file).
--
-- Three tables in the style of a product configurator for label printers and industrial
-- printing equipment. The data is deterministic (no random()) and the script is idempotent: it
-- creates the tables when they are missing, empties them and refills them, all in one
-- transaction. The rows deliberately include duplicates, NULLs, empty and blank strings, values
-- with leading or trailing spaces (which trim to values that also occur untrimmed), non-ASCII
-- text, and values that occur in more than one table.
--
-- Run with: psql "$URL" -v ON_ERROR_STOP=1 -f scripts/sample-data.sql

\set ON_ERROR_STOP on
SET client_min_messages = warning;
BEGIN;

CREATE TABLE IF NOT EXISTS config_option (
    id serial PRIMARY KEY,
    code text,
    description text
);

CREATE TABLE IF NOT EXISTS config_position (
    id serial PRIMARY KEY,
    position_no int,
    attribute_label text
);

CREATE TABLE IF NOT EXISTS htb_attribute_mapping_zebra_provided (
    id serial PRIMARY KEY,
    zebra_attribute text,
    attribute_name_for_htb text
);

TRUNCATE config_option, config_position, htb_attribute_mapping_zebra_provided RESTART IDENTITY;

-- ---------------------------------------------------------------------------------------------
-- config_option: orderable options with a code and a description.
-- ---------------------------------------------------------------------------------------------

-- Hand-written options, in a fixed order.
INSERT INTO config_option (code, description)
SELECT code, description
FROM (VALUES
    (1, 'TT203', 'Thermal transfer printing, 203 dpi'),
    (2, 'TT300', 'Thermal transfer printing, 300 dpi'),
    (3, 'TT600', 'Thermal transfer printing, 600 dpi'),
    (4, 'DT203', 'Direct thermal printing, 203 dpi'),
    (5, 'DT300', 'Direct thermal printing, 300 dpi'),
    (6, 'CUT-CT', 'Cutter with catch tray'),
    (7, 'CUT-GU', 'Guillotine cutter, media up to 0.25 mm'),
    (8, 'CUT-RO', 'Rotary cutter for continuous media'),
    (9, 'PEEL', 'Peel-off with liner take-up'),
    (10, 'PEEL-PR', 'Peel-off with passive liner rewind'),
    (11, 'RWD-FR', 'Full-roll rewinder, 203 mm outer diameter'),
    (12, 'RWD-INT', 'Internal rewinder for printed labels'),
    (13, 'LTS', 'Label taken sensor'),
    (14, 'RFID-UHF', 'UHF RFID encoder (ETSI and FCC regions)'),
    (15, 'RFID-HF', 'HF RFID encoder, ISO 15693 and NFC'),
    (16, 'RFID-ONM', 'On-metal RFID tag support'),
    (17, 'WLAN', 'Wireless LAN 802.11ac with Bluetooth 4.2'),
    (18, 'WLAN6', 'Wi-Fi 6 (802.11ax) with Bluetooth 5.3'),
    (19, 'ETH', 'Ethernet 10/100 internal print server'),
    (20, 'ETH-G', 'Gigabit Ethernet print server'),
    (21, 'SER', 'RS-232 serial interface'),
    (22, 'PAR', 'Parallel interface (IEEE 1284)'),
    (23, 'USBH', 'USB host port for keyboard and scanner'),
    (24, 'APPL', 'Applicator interface, 15-pin D-sub'),
    (25, 'APPL-EXT', 'Applicator interface with external 24 V supply'),
    (26, 'IO-8', 'Digital I/O module, 8 inputs / 8 outputs'),
    (27, 'PSU-INT', 'Internal power supply 100–240 V AC, 50/60 Hz'),
    (28, 'PSU-EXT', 'External power supply 24 V DC, 150 W'),
    (29, 'BATT', 'Battery pack 2600 mAh for mobile use'),
    (30, 'DISP-43', 'Colour touch display 4.3"'),
    (31, 'DISP-LED', 'Five-status LED indicator'),
    (32, 'KEYPAD', 'Keypad with display for stand-alone operation'),
    (33, 'MEDIA-HG', 'Media hanger for 203 mm (8") outer diameter rolls'),
    (34, 'MEDIA-UNW', 'External media unwinder, 300 mm roll diameter'),
    (35, 'FANFOLD', 'Fan-fold media feed from the rear'),
    (36, 'LINERLESS', 'Linerless media kit with non-stick platen'),
    (37, 'HEAD-FR', 'Flat-head printhead, easy replacement without tools'),
    (38, 'HEAD-NE', 'Near-edge printhead for thick media'),
    (39, 'PLATEN', 'Platen roller, silicone, 104 mm'),
    (40, 'SENSOR-BM', 'Black mark sensor, movable'),
    (41, 'SENSOR-GAP', 'Transmissive gap sensor, fixed centre position'),
    (42, 'RTC', 'Real-time clock with battery backup'),
    (43, 'FONT-ASIA', 'Asian font pack (Simplified and Traditional Chinese, Japanese, Korean)'),
    (44, 'FONT-TT', 'Scalable TrueType font package'),
    (45, 'EMUL-DPL', 'DPL printer language emulation'),
    (46, 'EMUL-IPL', 'IPL printer language emulation'),
    (47, 'LINK-OS', 'Link-OS remote management'),
    (48, 'ENC-AES', 'AES-256 encrypted storage for formats and graphics'),
    (49, 'ENCL-IP54', 'Protective enclosure, IP54'),
    (50, 'ENCL-IP65', 'Stainless steel washdown enclosure, IP65'),
    (51, 'HEAT', 'Heated enclosure for cold-storage use down to –20 °C'),
    (52, 'MOUNT-WALL', 'Wall mounting bracket'),
    (53, 'MOUNT-DIN', 'DIN rail mounting kit'),
    (54, 'CLEAN', 'Printhead cleaning kit (pens and swabs)'),
    (55, 'CAL', 'Factory calibration certificate'),
    (56, 'ESD', 'ESD-safe media path for electronics labels'),
    (57, 'MED-TAG', 'Medical wristband media kit'),
    (58, 'RIB-SAVE', 'Ribbon saver for long unprinted areas'),
    (59, 'RIB-WAX', 'Wax ribbon, 110 mm × 450 m'),
    (60, 'RIB-WR', 'Wax/resin ribbon, 110 mm × 450 m'),
    (61, 'RIB-RES', 'Resin ribbon, 110 mm × 300 m, for synthetic labels'),
    (62, 'LBL-PAPER', 'Paper labels, matte, permanent adhesive'),
    (63, 'LBL-PP', 'Polypropylene labels, glossy white'),
    (64, 'LBL-PET', 'Polyester labels, silver, for asset tags'),
    (65, 'LBL-PI', 'Polyimide labels, heat resistant up to 300 °C'),
    (66, 'LBL-TAG', 'Tag stock 0.25 mm, no adhesive'),
    (67, 'SW-DESIGN', 'Label design software, single seat'),
    (68, 'SW-DRIVER', 'Windows driver and font downloader'),
    (69, 'SW-SDK', 'Software development kit for Android and iOS'),
    (70, 'SVC-OS1', 'On-site service, next business day'),
    (71, 'SVC-RTB', 'Return-to-base repair service'),
    (72, 'SVC-INST', 'Installation and commissioning by a technician'),
    (73, 'TRAIN', 'Operator training, half day'),
    -- The same text as an earlier option under a second code: a duplicate value.
    (74, 'TT300-B', 'Thermal transfer printing, 300 dpi'),
    (75, 'CUT-CT2', 'Cutter with catch tray'),
    (76, 'ETH-2', 'Ethernet 10/100 internal print server'),
    -- Leading and trailing spaces: these trim to values that also occur as they are.
    (77, 'CUT-CT3', ' Cutter with catch tray'),
    (78, 'PEEL-2', 'Peel-off with liner take-up  '),
    (79, 'LTS-2', '  Label taken sensor  '),
    (80, 'RTC-X', '   Real-time clock with battery backup '),
    -- A value that only occurs with surrounding spaces.
    (81, 'NOTE-1', '  Printer ships without media and ribbon  '),
    -- NULL, empty and blank descriptions, and NULL codes.
    (82, 'TBD-1', NULL),
    (83, 'TBD-2', NULL),
    (84, 'TBD-3', ''),
    (85, 'TBD-4', '   '),
    (86, NULL, 'Spare parts kit, basic'),
    (87, NULL, NULL),
    -- Values that also occur in config_position or htb_attribute_mapping_zebra_provided.
    (88, 'ATTR-PW', 'Print width (mm)'),
    (89, 'ATTR-RFID', 'RFID encoder'),
    (90, 'ATTR-RES', 'Print resolution (dpi)')
) AS v(ord, code, description)
ORDER BY ord;

-- Generated options: printer model upgrade kits (8 models × 8 kits, all distinct).
INSERT INTO config_option (code, description)
SELECT 'KIT-' || m.model || '-' || lpad(k.n::text, 2, '0'),
       m.model || ' upgrade kit: ' || k.kit
FROM (VALUES (1, 'ZT411'), (2, 'ZT421'), (3, 'ZT610'), (4, 'ZT620'),
             (5, 'ZD421'), (6, 'ZD621'), (7, 'ZE511'), (8, 'ZE521')) AS m(ord, model)
CROSS JOIN (VALUES (1, 'cutter with catch tray'), (2, 'peel-off and liner take-up'),
                   (3, 'UHF RFID encoder'), (4, 'printhead 203 dpi'),
                   (5, 'printhead 300 dpi'), (6, 'platen roller'),
                   (7, 'wireless LAN card'), (8, 'real-time clock')) AS k(n, kit)
ORDER BY m.ord, k.n;

-- Generated options: print method × resolution × print width (2 × 3 × 4 = 24).
INSERT INTO config_option (code, description)
SELECT p.code || r.dpi || '-W' || w.mm,
       p.method || ' printing, ' || r.dpi || ' dpi, print width ' || w.mm || ' mm'
FROM (VALUES (1, 'TT', 'Thermal transfer'), (2, 'DT', 'Direct thermal')) AS p(ord, code, method)
CROSS JOIN (VALUES (203), (300), (600)) AS r(dpi)
CROSS JOIN (VALUES (104), (108), (168), (216)) AS w(mm)
ORDER BY p.ord, r.dpi, w.mm;

-- Generated options: ribbon length × winding (4 × 2 = 8).
INSERT INTO config_option (code, description)
SELECT 'RIB-L' || l.m || '-' || s.code,
       'Ribbon spindle for ' || l.m || ' m rolls, ink side ' || s.side
FROM (VALUES (74), (110), (300), (450)) AS l(m)
CROSS JOIN (VALUES (1, 'IN', 'in'), (2, 'OUT', 'out')) AS s(ord, code, side)
ORDER BY l.m, s.ord;

-- Generated options: media core diameters and maximum print speeds.
INSERT INTO config_option (code, description)
SELECT 'CORE-' || c.mm, 'Media core adapter ' || c.mm || ' mm (' || c.inch || '")'
FROM (VALUES (1, 25, '1'), (2, 38, '1.5'), (3, 76, '3')) AS c(ord, mm, inch)
ORDER BY c.ord;

INSERT INTO config_option (code, description)
SELECT 'SPD-' || s.mm, 'Print speed up to ' || s.mm || ' mm/s (' || s.ips || ' ips)'
FROM (VALUES (102, 4), (152, 6), (203, 8), (254, 10), (305, 12), (356, 14)) AS s(mm, ips)
ORDER BY s.mm;

-- Generated options: power cords per country (10) and warranty extensions (4 × 2 = 8).
INSERT INTO config_option (code, description)
SELECT 'CORD-' || c.cc, 'Power cord, ' || c.country || ' plug'
FROM (VALUES (1, 'EU', 'EU (Schuko)'), (2, 'UK', 'UK'), (3, 'US', 'US/Canada'),
             (4, 'CH', 'Switzerland'), (5, 'AU', 'Australia'), (6, 'JP', 'Japan'),
             (7, 'CN', 'China'), (8, 'IN', 'India'), (9, 'BR', 'Brazil'),
             (10, 'ZA', 'South Africa')) AS c(ord, cc, country)
ORDER BY c.ord;

INSERT INTO config_option (code, description)
SELECT 'WTY-' || y.n || s.code,
       'Warranty extension to ' || y.n || ' years, ' || s.kind
FROM (VALUES (2), (3), (4), (5)) AS y(n)
CROSS JOIN (VALUES (1, 'OS', 'on-site'), (2, 'RTB', 'return-to-base')) AS s(ord, code, kind)
ORDER BY y.n, s.ord;

-- Generated options: label materials × finishes (5 × 3 = 15).
INSERT INTO config_option (code, description)
SELECT 'MAT-' || m.code || '-' || f.code,
       'Label material ' || m.material || ', ' || f.finish || ' finish'
FROM (VALUES (1, 'PAP', 'paper'), (2, 'PP', 'polypropylene'), (3, 'PE', 'polyethylene'),
             (4, 'PET', 'polyester'), (5, 'PI', 'polyimide')) AS m(ord, code, material)
CROSS JOIN (VALUES (1, 'M', 'matte'), (2, 'G', 'gloss'), (3, 'S', 'semi-gloss')) AS f(ord, code, finish)
ORDER BY m.ord, f.ord;

-- Generated options: memory expansions (4) and display languages (12).
INSERT INTO config_option (code, description)
SELECT 'MEM-' || n.mb, 'Flash memory expansion to ' || n.mb || ' MB'
FROM (VALUES (128), (256), (512), (1024)) AS n(mb)
ORDER BY n.mb;

INSERT INTO config_option (code, description)
SELECT 'LANG-' || l.code, 'Display and manual language: ' || l.lang
FROM (VALUES (1, 'DE', 'German'), (2, 'EN', 'English'), (3, 'FR', 'French'),
             (4, 'ES', 'Spanish'), (5, 'IT', 'Italian'), (6, 'NL', 'Dutch'),
             (7, 'PL', 'Polish'), (8, 'PT', 'Portuguese'), (9, 'CS', 'Czech'),
             (10, 'SV', 'Swedish'), (11, 'TR', 'Turkish'), (12, 'JA', 'Japanese')) AS l(ord, code, lang)
ORDER BY l.ord;

-- Generated options: maximum label lengths in 100 mm steps (20).
INSERT INTO config_option (code, description)
SELECT 'LEN-' || g.mm, 'Maximum label length ' || g.mm || ' mm'
FROM generate_series(100, 2000, 100) AS g(mm)
ORDER BY g.mm;

-- Generated options: a few model-specific repeats of the same option (duplicates on purpose).
INSERT INTO config_option (code, description)
SELECT m.model || '-' || o.code, o.description
FROM (VALUES (1, 'ZT411'), (2, 'ZT421'), (3, 'ZT610'), (4, 'ZT620')) AS m(ord, model)
CROSS JOIN (VALUES (1, 'TT300', 'Thermal transfer printing, 300 dpi'),
                   (2, 'ETH', 'Ethernet 10/100 internal print server'),
                   (3, 'WLAN', 'Wireless LAN 802.11ac with Bluetooth 4.2'),
                   (4, 'RTC', 'Real-time clock with battery backup')) AS o(ord, code, description)
ORDER BY m.ord, o.ord;

-- Generated options: spare printheads per model and resolution (8 × 3 = 24).
INSERT INTO config_option (code, description)
SELECT 'PH-' || m.model || '-' || r.dpi,
       'Spare printhead ' || r.dpi || ' dpi for ' || m.model
FROM (VALUES (1, 'ZT411'), (2, 'ZT421'), (3, 'ZT610'), (4, 'ZT620'),
             (5, 'ZD421'), (6, 'ZD621'), (7, 'ZE511'), (8, 'ZE521')) AS m(ord, model)
CROSS JOIN (VALUES (203), (300), (600)) AS r(dpi)
ORDER BY m.ord, r.dpi;

-- ---------------------------------------------------------------------------------------------
-- config_position: the attribute labels shown at each position of the configurator.
-- ---------------------------------------------------------------------------------------------

-- Hand-written labels for the first configurator screen, numbered 10, 20, 30, ...
INSERT INTO config_position (position_no, attribute_label)
SELECT ord * 10, label
FROM (VALUES
    (1, 'Print width (mm)'),
    (2, 'Print resolution (dpi)'),
    (3, 'Print method'),
    (4, 'Max. print speed (mm/s)'),
    (5, 'Max. label length (mm)'),
    (6, 'Min. label length (mm)'),
    (7, 'Media width, min. (mm)'),
    (8, 'Media width, max. (mm)'),
    (9, 'Media thickness (mm)'),
    (10, 'Media type'),
    (11, 'Media roll outer diameter (mm)'),
    (12, 'Media core inner diameter (mm)'),
    (13, 'Ribbon width (mm)'),
    (14, 'Ribbon length (m)'),
    (15, 'Ribbon ink side'),
    (16, 'Ribbon core inner diameter (mm)'),
    (17, 'Media sensor type'),
    (18, 'Media handling'),
    (19, 'Cutter'),
    (20, 'Cutter with catch tray'),
    (21, 'Peel-off with liner take-up'),
    (22, 'RFID encoder'),
    (23, 'RFID frequency band'),
    (24, 'Interfaces'),
    (25, 'Wireless connectivity'),
    (26, 'Printer languages'),
    (27, 'Resident fonts'),
    (28, 'Flash memory (MB)'),
    (29, 'RAM (MB)'),
    (30, 'Display'),
    (31, 'Operating temperature (°C)'),
    (32, 'Storage temperature (°C)'),
    (33, 'Relative humidity, non-condensing (%)'),
    (34, 'Power supply'),
    (35, 'Power consumption, idle (W)'),
    (36, 'Power consumption, printing (W)'),
    (37, 'Dimensions W × H × D (mm)'),
    (38, 'Weight (kg)'),
    (39, 'Housing material'),
    (40, 'Protection class (IP)'),
    (41, 'Certifications'),
    (42, 'Barcode symbologies, 1D'),
    (43, 'Barcode symbologies, 2D'),
    (44, 'Real-time clock'),
    (45, 'Warranty'),
    (46, 'Colour'),
    (47, 'Country of origin'),
    (48, 'Customs tariff number'),
    (49, 'EAN / GTIN'),
    (50, 'Manufacturer part number'),
    (51, 'Label gap (mm)'),
    (52, 'Black mark length (mm)'),
    (53, 'Tear-off edge'),
    (54, 'Printhead life (km)'),
    (55, 'Platen roller material'),
    (56, 'Applicator interface'),
    (57, 'Digital inputs'),
    (58, 'Digital outputs'),
    (59, 'Noise level (dB(A))'),
    (60, 'Mounting options'),
    -- Leading and trailing spaces, NULL, empty and blank labels.
    (61, ' Print width (mm)'),
    (62, 'Weight (kg) '),
    (63, '  Display language  '),
    (64, NULL),
    (65, ''),
    (66, '  '),
    (67, NULL)
) AS v(ord, label)
ORDER BY ord;

-- The second and third screens (industrial and desktop printers) repeat most of the labels of the
-- first one (duplicates on purpose) under positions 1010, 1020, ... and 2010, 2020, ...
INSERT INTO config_position (position_no, attribute_label)
SELECT s.base + (p.position_no % 1000), p.attribute_label
FROM config_position AS p
CROSS JOIN (VALUES (1000), (2000)) AS s(base)
WHERE p.position_no < 1000
  AND p.attribute_label IS NOT NULL
ORDER BY s.base, p.position_no;

-- Generated labels: applicator I/O pins (16), print zones (6), label stock slots (8).
INSERT INTO config_position (position_no, attribute_label)
SELECT 3000 + g.n * 10, 'Applicator I/O pin ' || g.n || ' function'
FROM generate_series(1, 16) AS g(n)
ORDER BY g.n;

INSERT INTO config_position (position_no, attribute_label)
SELECT 3200 + g.n * 10, 'Print zone ' || g.n || ' darkness offset'
FROM generate_series(1, 6) AS g(n)
ORDER BY g.n;

INSERT INTO config_position (position_no, attribute_label)
SELECT 3300 + g.n * 10, 'Label stock ' || chr(64 + g.n) || ': width (mm)'
FROM generate_series(1, 8) AS g(n)
ORDER BY g.n;

-- Generated labels: per-interface settings (6 interfaces × 3 settings = 18).
INSERT INTO config_position (position_no, attribute_label)
SELECT 3400 + i.ord * 10 + s.ord, i.name || ': ' || s.setting
FROM (VALUES (1, 'USB'), (2, 'Ethernet'), (3, 'Wi-Fi'), (4, 'Bluetooth'),
             (5, 'RS-232'), (6, 'Parallel')) AS i(ord, name)
CROSS JOIN (VALUES (1, 'enabled'), (2, 'timeout (s)'), (3, 'protocol')) AS s(ord, setting)
ORDER BY i.ord, s.ord;

-- Generated labels: sensor positions (8).
INSERT INTO config_position (position_no, attribute_label)
SELECT 3500 + g.n * 10, 'Media sensor ' || g.n || ' position from left edge (mm)'
FROM generate_series(1, 8) AS g(n)
ORDER BY g.n;

-- Positions imported from HTB that still carry the HTB attribute key as their label: values
-- shared with htb_attribute_mapping_zebra_provided.attribute_name_for_htb.
INSERT INTO config_position (position_no, attribute_label)
SELECT 4000 + v.ord * 10, v.label
FROM (VALUES (1, 'PRINT_RESOLUTION_DPI'), (2, 'PRINT_WIDTH_MM'), (3, 'WEIGHT_KG'),
             (4, 'OPTION_RFID')) AS v(ord, label)
ORDER BY v.ord;

-- ---------------------------------------------------------------------------------------------
-- htb_attribute_mapping_zebra_provided: attribute names as Zebra provides them, mapped to the
-- attribute names used in HTB.
-- ---------------------------------------------------------------------------------------------

-- Hand-written mappings.
INSERT INTO htb_attribute_mapping_zebra_provided (zebra_attribute, attribute_name_for_htb)
SELECT zebra, htb
FROM (VALUES
    (1, 'Print Resolution', 'PRINT_RESOLUTION_DPI'),
    (2, 'Print width (mm)', 'PRINT_WIDTH_MM'),
    (3, 'Maximum Print Width', 'PRINT_WIDTH_MM'),
    (4, 'Print Method', 'PRINT_METHOD'),
    (5, 'Maximum Print Speed', 'PRINT_SPEED_MAX_MM_S'),
    (6, 'Maximum Print Length', 'LABEL_LENGTH_MAX_MM'),
    (7, 'Minimum Label Length', 'LABEL_LENGTH_MIN_MM'),
    (8, 'Media Width Minimum', 'MEDIA_WIDTH_MIN_MM'),
    (9, 'Media Width Maximum', 'MEDIA_WIDTH_MAX_MM'),
    (10, 'Media Thickness', 'MEDIA_THICKNESS_MM'),
    (11, 'Media Types', 'MEDIA_TYPE'),
    (12, 'Maximum Roll Size', 'MEDIA_ROLL_OD_MAX_MM'),
    (13, 'Core Diameter', 'MEDIA_CORE_ID_MM'),
    (14, 'Ribbon Width', 'RIBBON_WIDTH_MM'),
    (15, 'Ribbon Length', 'RIBBON_LENGTH_M'),
    (16, 'Ribbon Setup', 'RIBBON_INK_SIDE'),
    (17, 'Ribbon Core', 'RIBBON_CORE_ID_MM'),
    (18, 'Media Sensing', 'MEDIA_SENSOR_TYPE'),
    (19, 'Media Handling', 'MEDIA_HANDLING'),
    (20, 'Cutter', 'OPTION_CUTTER'),
    (21, 'Cutter with catch tray', 'OPTION_CUTTER_CATCH_TRAY'),
    (22, 'Peel', 'OPTION_PEEL'),
    (23, 'Rewind', 'OPTION_REWIND'),
    (24, 'RFID encoder', 'OPTION_RFID'),
    (25, 'RFID Standards', 'RFID_STANDARDS'),
    (26, 'Communication Interfaces', 'INTERFACES'),
    (27, 'Wireless', 'WIRELESS'),
    (28, 'Programming Languages', 'PRINTER_LANGUAGES'),
    (29, 'Resident Fonts', 'FONTS_RESIDENT'),
    (30, 'Flash Memory', 'MEMORY_FLASH_MB'),
    (31, 'SDRAM', 'MEMORY_RAM_MB'),
    (32, 'User Interface', 'DISPLAY'),
    (33, 'Operating Temperature', 'TEMP_OPERATING_C'),
    (34, 'Storage Temperature', 'TEMP_STORAGE_C'),
    (35, 'Operating Humidity', 'HUMIDITY_OPERATING_PCT'),
    (36, 'Electrical', 'POWER_SUPPLY'),
    (37, 'Power Consumption', 'POWER_CONSUMPTION_W'),
    (38, 'Dimensions', 'DIMENSIONS_WHD_MM'),
    (39, 'Weight', 'WEIGHT_KG'),
    (40, 'Construction', 'HOUSING_MATERIAL'),
    (41, 'Agency Approvals', 'CERTIFICATIONS'),
    (42, 'Linear Barcodes', 'BARCODES_1D'),
    (43, '2D Barcodes', 'BARCODES_2D'),
    (44, 'Real Time Clock', 'OPTION_RTC'),
    (45, 'Standard Warranty', 'WARRANTY_MONTHS'),
    (46, 'Color', 'COLOUR'),
    (47, 'Country of Origin', 'COUNTRY_OF_ORIGIN'),
    (48, 'HTS Code', 'CUSTOMS_TARIFF_NO'),
    (49, 'UPC', 'GTIN'),
    (50, 'Part Number', 'MANUFACTURER_PART_NO'),
    (51, 'Printhead', 'PRINTHEAD_TYPE'),
    (52, 'Platen', 'PLATEN_MATERIAL'),
    (53, 'Applicator Port', 'OPTION_APPLICATOR_IF'),
    (54, 'Acoustic Noise', 'NOISE_DBA'),
    (55, 'Mounting', 'MOUNTING'),
    (56, 'Print resolution (dpi)', 'PRINT_RESOLUTION_DPI'),
    (57, 'Firmware', 'FIRMWARE_VERSION'),
    (58, 'Print Management', 'REMOTE_MANAGEMENT'),
    (59, 'Security', 'SECURITY_FEATURES'),
    (60, 'Operating System', 'OS_PLATFORM'),
    -- The same Zebra attribute listed twice (a duplicate), and spacing variants.
    (61, 'Print Resolution', 'PRINT_RESOLUTION_DPI'),
    (62, 'Maximum Print Speed ', 'PRINT_SPEED_MAX_MM_S'),
    (63, ' Media Types', 'MEDIA_TYPE'),
    (64, '  Weight  ', ' WEIGHT_KG '),
    -- Unmapped attributes (NULL target) and broken rows.
    (65, 'Sustainability Information', NULL),
    (66, 'Marketing Claim', NULL),
    (67, NULL, 'LEGACY_FIELD_1'),
    (68, '', 'LEGACY_FIELD_2'),
    (69, '   ', ''),
    (70, NULL, NULL)
) AS v(ord, zebra, htb)
ORDER BY ord;

-- Generated mappings: per-model attributes (8 models × 12 attributes = 96).
INSERT INTO htb_attribute_mapping_zebra_provided (zebra_attribute, attribute_name_for_htb)
SELECT m.model || ' ' || a.zebra, m.model || '_' || a.htb
FROM (VALUES (1, 'ZT411'), (2, 'ZT421'), (3, 'ZT610'), (4, 'ZT620'),
             (5, 'ZD421'), (6, 'ZD621'), (7, 'ZE511'), (8, 'ZE521')) AS m(ord, model)
CROSS JOIN (VALUES (1, 'Print Resolution', 'PRINT_RESOLUTION_DPI'),
                   (2, 'Maximum Print Width', 'PRINT_WIDTH_MM'),
                   (3, 'Maximum Print Speed', 'PRINT_SPEED_MAX_MM_S'),
                   (4, 'Maximum Roll Size', 'MEDIA_ROLL_OD_MAX_MM'),
                   (5, 'Ribbon Length', 'RIBBON_LENGTH_M'),
                   (6, 'Communication Interfaces', 'INTERFACES'),
                   (7, 'Dimensions', 'DIMENSIONS_WHD_MM'),
                   (8, 'Weight', 'WEIGHT_KG'),
                   (9, 'Electrical', 'POWER_SUPPLY'),
                   (10, 'Options', 'OPTIONS'),
                   (11, 'Printhead', 'PRINTHEAD_TYPE'),
                   (12, 'Part Number', 'MANUFACTURER_PART_NO')) AS a(ord, zebra, htb)
ORDER BY m.ord, a.ord;

-- Generated mappings: interface details (6 interfaces × 3 properties = 18).
INSERT INTO htb_attribute_mapping_zebra_provided (zebra_attribute, attribute_name_for_htb)
SELECT i.zebra || ' ' || p.zebra, 'IF_' || i.htb || '_' || p.htb
FROM (VALUES (1, 'USB 2.0', 'USB'), (2, 'Ethernet', 'ETH'), (3, '802.11ac', 'WLAN'),
             (4, 'Bluetooth', 'BT'), (5, 'Serial RS-232', 'SERIAL'),
             (6, 'Parallel', 'PARALLEL')) AS i(ord, zebra, htb)
CROSS JOIN (VALUES (1, 'Support', 'AVAILABLE'), (2, 'Connector', 'CONNECTOR'),
                   (3, 'Speed', 'SPEED')) AS p(ord, zebra, htb)
ORDER BY i.ord, p.ord;

-- Generated mappings: barcode symbologies (20).
INSERT INTO htb_attribute_mapping_zebra_provided (zebra_attribute, attribute_name_for_htb)
SELECT 'Barcode: ' || b.name, 'BARCODE_' || b.htb
FROM (VALUES (1, 'Code 11', 'CODE11'), (2, 'Code 39', 'CODE39'), (3, 'Code 93', 'CODE93'),
             (4, 'Code 128', 'CODE128'), (5, 'EAN-8', 'EAN8'), (6, 'EAN-13', 'EAN13'),
             (7, 'UPC-A', 'UPCA'), (8, 'UPC-E', 'UPCE'), (9, 'Interleaved 2 of 5', 'I2OF5'),
             (10, 'Codabar', 'CODABAR'), (11, 'MSI', 'MSI'), (12, 'Plessey', 'PLESSEY'),
             (13, 'GS1 DataBar', 'GS1_DATABAR'), (14, 'PDF417', 'PDF417'),
             (15, 'MicroPDF417', 'MICROPDF417'), (16, 'QR Code', 'QR'),
             (17, 'Data Matrix', 'DATAMATRIX'), (18, 'Aztec', 'AZTEC'),
             (19, 'MaxiCode', 'MAXICODE'), (20, 'TLC 39', 'TLC39')) AS b(ord, name, htb)
ORDER BY b.ord;

-- Generated mappings: certifications per region (12).
INSERT INTO htb_attribute_mapping_zebra_provided (zebra_attribute, attribute_name_for_htb)
SELECT 'Agency Approval: ' || c.name, 'CERT_' || c.htb
FROM (VALUES (1, 'CE', 'CE'), (2, 'UKCA', 'UKCA'), (3, 'FCC Class A', 'FCC_A'),
             (4, 'FCC Class B', 'FCC_B'), (5, 'cULus', 'CULUS'), (6, 'CCC', 'CCC'),
             (7, 'KC', 'KC'), (8, 'RCM', 'RCM'), (9, 'VCCI', 'VCCI'),
             (10, 'BIS', 'BIS'), (11, 'EAC', 'EAC'), (12, 'NOM', 'NOM')) AS c(ord, name, htb)
ORDER BY c.ord;

COMMIT;

-- A summary of what was loaded: rows, distinct non-empty trimmed values per text column.
SELECT 'config_option.description' AS source_column,
       count(*) AS row_count,
       count(DISTINCT NULLIF(trim(description), '')) AS distinct_values
FROM config_option
UNION ALL
SELECT 'config_position.attribute_label', count(*),
       count(DISTINCT NULLIF(trim(attribute_label), ''))
FROM config_position
UNION ALL
SELECT 'htb_attribute_mapping_zebra_provided.zebra_attribute', count(*),
       count(DISTINCT NULLIF(trim(zebra_attribute), ''))
FROM htb_attribute_mapping_zebra_provided
UNION ALL
SELECT 'htb_attribute_mapping_zebra_provided.attribute_name_for_htb', count(*),
       count(DISTINCT NULLIF(trim(attribute_name_for_htb), ''))
FROM htb_attribute_mapping_zebra_provided;
